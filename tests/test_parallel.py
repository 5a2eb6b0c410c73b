"""Ulysses sequence parallelism on CPU processes (gloo): the same code path as on GPUs
(nccl), on tiny fp32 models. One spawn per test, several checks inside (a spawn costs
seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_parallel import SP_DIT, fail_on_rank_1, sequence_parallel_checks

from wanrender.errors import WanrenderError
from wanrender.parallel.launch import check_same_devices, check_world, launch
from wanrender.parallel.ulysses import check_heads

# The attention of each head sees exactly the single-process inputs and the exchanges
# are exact copies; what differs is the matmuls' rounding: a shard has fewer rows, so
# the CPU BLAS may block and sum differently. That is a few fp32 ulps per layer
# (relative 1e-7), amplified by the layers and the norms: 1e-5 of the output's scale
# leaves two orders of magnitude for it while any real error (a wrong position, a pad
# token attended to, a head in the wrong place) is of order 1. Measured on 2 and 4
# ranks: at most 3.2e-7 (the padded cases came out bit-identical); attending to the
# pad gives 1e-2 to 0.4.
TOL = 1e-5


def _close(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("ranks", [2, 4])
def test_sequence_parallel_forward_and_sampling_match_one_process(ranks: int) -> None:
    results = launch(sequence_parallel_checks, ranks, "cpu", heads=SP_DIT.num_heads)
    assert len(results) == ranks
    for rank, r in enumerate(results):
        # Every process we start keeps NVLink multicast off and meets on loopback.
        assert r["env"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                            "NVSHMEM_DISABLE_NVLS": "1", "MASTER_ADDR": "127.0.0.1"}  # fmt: skip
        for (shape, sp, ref), (_, sp0, _) in zip(r["forward"], results[0]["forward"]):
            assert _close(sp, ref) < TOL, (rank, shape)
            assert torch.equal(sp, sp0)  # every rank gathers the same output
        # The whole turbo render's latent (4 euler steps, both experts).
        assert _close(r["sampled"], r["sampled_ref"]) < TOL
        assert torch.equal(r["sampled"], results[0]["sampled"])
        dtype_msg, weights_msg = r["mismatch"]
        assert dtype_msg == (
            "rank 1 and rank 0 differ in expert 2's compute dtype (torch.float32 vs torch.bfloat16) — every GPU "
            "must load the same model files with the same settings on the same kind of GPU"
        )
        assert "expert 2's weights (different checksums)" in weights_msg


@pytest.mark.parametrize("ranks", [2, 4])
def test_the_vae_decode_split_by_rows_equals_the_whole_decode(ranks: int) -> None:
    """Each rank's band is those rows of the whole decode: the same convolutions on a
    window of rows (fp32: summation order only; measured on this CPU at most 2.4e-7 on
    [-1, 1], and identical uint8 frames), so uint8 may move one level in a rare pixel, while a wrong
    window or band moves most values by far more. Rank 0 gets every frame, as
    chunks (1, then 4 frames per latent frame); the others none."""
    from helpers_parallel import split_decode_checks

    results = launch(split_decode_checks, ranks, "cpu")
    for r in results:
        for case in r["cases"]:
            assert case["band_gap"] < 1e-5, (r["rank"], case["height"])
            if r["rank"] == 0:
                got, want = case["frames"], case["whole"]
                assert got.shape == want.shape == (9, case["height"] * 8, 40, 3)
                diff = np.abs(got.astype(int) - want.astype(int))
                assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
                assert case["chunks"] == [1, 4, 4]
            else:
                assert case["frames"].shape[0] == 0 and case["chunks"] == []
        # Rank 0 tiled alone, or all split: either way every rank returned, frames on rank 0 only.
        assert r["rank0_tiled"] == r["others_tiled"] == ((5, 64, 40, 3) if r["rank"] == 0 else (0, 64, 40, 3))


def test_bands_cover_the_rows() -> None:
    from wanrender.parallel.decode import bands, can_split

    assert bands(104, 4) == [(0, 26), (26, 52), (52, 78), (78, 104)]
    assert bands(7, 4) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert not can_split(3, 4) and not can_split(8, 1) and can_split(4, 4)
    with pytest.raises(ValueError, match="cannot split 3 rows into 4 bands"):
        bands(3, 4)


def test_a_failing_rank_ends_the_run_with_its_one_line() -> None:
    start = time.monotonic()
    with pytest.raises(WanrenderError) as err:
        launch(fail_on_rank_1, 2, "cpu", args=("error",))
    assert str(err.value) == "rank 1 found bad input — fix it and run again"
    assert time.monotonic() - start < 60  # rank 0 was not left waiting for its collective's timeout


def test_a_rank_that_dies_is_named_and_the_others_are_stopped() -> None:
    with pytest.raises(WanrenderError) as err:
        launch(fail_on_rank_1, 2, "cpu", args=("die",))
    assert str(err.value).startswith("rank 1 of 2 (process 1) stopped (killed by SIGKILL); the other ranks were")
    assert "\n" not in str(err.value)


def test_bad_rank_counts_are_refused_before_anything_starts() -> None:
    with pytest.raises(WanrenderError) as err:
        check_heads(3, 40)
    assert (
        str(err.value)
        == "3 GPUs cannot share the DiT's 40 attention heads evenly — use 2, 4, 5, 8, 10 (a divisor of 40)"
    )
    with pytest.raises(WanrenderError, match="^3 GPUs cannot share the DiT's 4 attention heads evenly — use 2, 4 "):
        launch(sequence_parallel_checks, 3, "cpu", heads=4)  # refused before a process starts
    with pytest.raises(WanrenderError, match="^0 GPUs asked — use 1 or more$"):
        check_world(0, 40, "cpu")
    with pytest.raises(WanrenderError, match="^device 'mps' cannot run several processes"):
        check_world(2, 40, "mps")


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs a machine with fewer than 2 GPUs")
def test_more_gpus_than_present_is_refused() -> None:
    count = torch.cuda.device_count()
    with pytest.raises(WanrenderError) as err:
        launch(sequence_parallel_checks, 2, "cuda", heads=4)
    msg = str(err.value)
    assert msg.startswith(f"2 GPUs asked but {count} present") and msg.endswith(f"— ask for at most {count}")


def test_mismatched_gpus_are_named() -> None:
    # The ranks' descriptions come from torch.cuda.get_device_properties on a GPU
    # machine; here the comparison itself is checked on two made-up descriptions.
    check_same_devices(["NVIDIA H200, sm_90, 140 GiB"] * 4)
    with pytest.raises(WanrenderError) as err:
        check_same_devices(["NVIDIA H200, sm_90, 140 GiB", "NVIDIA H100, sm_90, 80 GiB"])
    assert str(err.value) == (
        "rank 1 has a different GPU (NVIDIA H100, sm_90, 80 GiB) than rank 0 (NVIDIA H200, sm_90, 140 GiB) — "
        "sequence parallelism needs identical GPUs; choose them with CUDA_VISIBLE_DEVICES"
    )


def test_under_torchrun_the_processes_join_its_group() -> None:
    """torchrun starts the ranks: launch runs the function once per process, gathers
    every rank's result, and refuses a rank count that is not torchrun's."""
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": str(tests.parent / "src"), "OMP_NUM_THREADS": "1"}
    for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        env.pop(k, None)  # launch sets them in the ranks itself
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tests / "helpers_parallel.py")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    out = json.loads(line[len("RESULT ") :])
    assert out["refused"] == "torchrun started 2 processes but 4 GPUs were asked — make them the same"
    assert [r["rank"] for r in out["results"]] == [0, 1]
    for r in out["results"]:
        assert r["gap"] < TOL
        assert r["env"] == {
            "NCCL_NVLS_ENABLE": "0",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1",
        }
