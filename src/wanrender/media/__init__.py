"""Video file input and output (PyAV; no ffmpeg binary needed)."""

from wanrender.media.video import VideoInfo, iter_video, probe_video, read_video, write_video

__all__ = ["VideoInfo", "iter_video", "probe_video", "read_video", "write_video"]
