"""Several processes (one per GPU) rendering one video together.

- ``ulysses``: sequence parallelism for the DiT (DeepSpeed-Ulysses): every rank holds
  a contiguous shard of the tokens; around self-attention two all-to-alls trade the
  sequence shard for a head shard and back. ``SequenceParallel(model)`` is a drop-in
  denoiser for ``pipeline.i2v.sample``.
- ``launch``: starts the processes (or joins torchrun's), sets up the process group,
  and turns a failing rank into one line.

Nothing here runs at import time; ``torch.distributed`` is set up only by ``launch``.
"""
