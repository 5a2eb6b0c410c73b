import time, numpy as np, sys
sys.path.insert(0, str(__import__('pathlib').Path(__file__).parent))
from gpu_interp import pan_clip
from wanrender.interp.flow import DisInterpolator, interpolate_frames
clip = pan_clip(33, 832, 480)
interp = DisInterpolator()
list(interpolate_frames(iter(clip[:3]), interp, 2))
ts=[]
for _ in range(3):
    t0=time.perf_counter(); out=list(interpolate_frames(iter(clip), interp, 2)); ts.append(time.perf_counter()-t0)
print("DIS 832x480 x2: 33->%d frames, new frames/s: %s" % (len(out), [round(32/t,1) for t in ts]))
