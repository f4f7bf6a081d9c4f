"""The device and precision policy (featureshift.device): each rule decided on explicit facts
about a machine, so the CUDA, MPS and cluster branches are checked here on a CPU."""
from __future__ import annotations

import pytest
import torch

from featureshift.device import (CPU_MAX_BATCH, GPU_MAX_BATCH, amp_dtype, autocast, choose_device,
                                 choose_rank_device, choose_render_precision, choose_training_precision,
                                 core_count, loader_workers, max_batch, mps_available, ranks_use_gpus, ray_placement,
                                 resolve_device, resolve_precision, threads_per_process, torch_dtype, uses_gpu)
from featureshift.errors import FeatureshiftError

NO_GPU = dict(cuda_available=False, cuda_count=0, mps_available=False)
TWO_GPUS = dict(cuda_available=True, cuda_count=2, mps_available=False)
MAC = dict(cuda_available=False, cuda_count=0, mps_available=True)


@pytest.mark.parametrize("spec, machine, chosen", [
    ("auto", TWO_GPUS, "cuda"), ("auto", MAC, "mps"), ("auto", NO_GPU, "cpu"),
    ("cpu", TWO_GPUS, "cpu"), ("cuda", TWO_GPUS, "cuda"), ("cuda:1", TWO_GPUS, "cuda:1"), ("mps", MAC, "mps"),
    (" cpu ", NO_GPU, "cpu"),
])
def test_a_process_gets_the_first_gpu_else_mps_else_the_cpu(spec, machine, chosen):
    assert choose_device(spec, **machine) == chosen


@pytest.mark.parametrize("spec, machine, words", [
    ("cuda", NO_GPU, "sees no CUDA GPU"), ("cuda:0", MAC, "sees no CUDA GPU"),
    ("cuda:2", TWO_GPUS, "has 2 CUDA GPU(s)"), ("mps", TWO_GPUS, "MPS is not available"),
    ("tpu", TWO_GPUS, "Unknown device 'tpu'"),
])
def test_a_device_the_machine_lacks_is_an_error_not_a_fallback(spec, machine, words):
    with pytest.raises(FeatureshiftError, match=words.replace("(", r"\(").replace(")", r"\)")):
        choose_device(spec, **machine)


def test_resolve_device_on_this_machine_follows_the_rule():
    facts = dict(cuda_available=torch.cuda.is_available(), cuda_count=torch.cuda.device_count(),
                 mps_available=mps_available())
    assert resolve_device("auto") == torch.device(choose_device("auto", **facts))
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec, rank, cuda, count, chosen", [
    ("auto", 1, True, 2, "cuda:1"), ("cuda", 0, True, 2, "cuda:0"), ("auto", 3, False, 0, "cpu"),
    ("cpu", 1, True, 2, "cpu"),
])
def test_each_training_rank_takes_its_own_gpu_or_the_cpu(spec, rank, cuda, count, chosen):
    assert choose_rank_device(spec, rank, cuda_available=cuda, cuda_count=count) == chosen


@pytest.mark.parametrize("spec, rank, cuda, count, words", [
    ("cuda:0", 0, True, 2, "cannot be shared"), ("mps", 0, False, 0, "cannot be shared"),
    ("cuda", 2, True, 2, "needs cuda:2, but the machine has 2 GPU"), ("cuda", 0, False, 0, "sees no CUDA GPU"),
])
def test_a_rank_without_a_gpu_of_its_own_is_refused(spec, rank, cuda, count, words):
    with pytest.raises(FeatureshiftError, match=words):
        choose_rank_device(spec, rank, cuda_available=cuda, cuda_count=count)


def test_nproc_processes_take_gpus_only_for_auto_or_cuda_on_a_cuda_machine():
    assert ranks_use_gpus("auto", cuda_available=True) and ranks_use_gpus("cuda", cuda_available=True)
    assert not ranks_use_gpus("auto", cuda_available=False) and not ranks_use_gpus("cpu", cuda_available=True)


def test_renders_use_a_gpu_for_cuda_or_for_auto_where_cuda_is():
    assert uses_gpu("cuda:1", cuda_available=False) and uses_gpu("auto", cuda_available=True)
    assert not uses_gpu("auto", cuda_available=False) and not uses_gpu("cpu", cuda_available=True)
    assert not uses_gpu("mps", cuda_available=True)


def test_a_ray_cluster_with_gpus_gets_one_gpu_task_per_gpu():
    place = ray_placement("auto", cluster_gpus=4, cluster_cpus=64, widest_node_cpus=32, own_threads=8)
    assert (place.device, place.gpu, place.threads, place.slots) == ("cuda", True, None, 4)
    assert place.resources == {"num_gpus": 1, "num_cpus": 1}
    assert max_batch(place.gpu) == GPU_MAX_BATCH


def test_a_cpu_ray_cluster_gets_tasks_with_this_process_thread_count_at_most_the_widest_node():
    place = ray_placement("auto", cluster_gpus=0, cluster_cpus=12, widest_node_cpus=4, own_threads=8)
    assert (place.device, place.gpu, place.threads, place.slots) == ("cpu", False, 4, 3)
    assert place.resources == {"num_cpus": 4}
    # the CPU is asked for on a cluster with GPUs; an empty cluster still gets one slot of one thread
    assert ray_placement("cpu", cluster_gpus=2, cluster_cpus=8, widest_node_cpus=8, own_threads=2).slots == 4
    assert ray_placement("auto", cluster_gpus=0, cluster_cpus=0, widest_node_cpus=0, own_threads=2).slots == 1
    assert max_batch(place.gpu) == CPU_MAX_BATCH


def test_cuda_on_a_ray_cluster_without_gpus_is_an_error():
    with pytest.raises(FeatureshiftError, match="Ray cluster has no GPUs"):
        ray_placement("cuda", cluster_gpus=0, cluster_cpus=8, widest_node_cpus=8, own_threads=2)


def test_batch_caps_fill_a_gpu_and_stop_where_a_cpu_gains_nothing():
    assert (max_batch(True), max_batch(False)) == (1024, 64)


@pytest.mark.parametrize("device_type, cores, workers", [
    ("cuda", 16, 8), ("cuda", 4, 3), ("cuda", 1, 1), ("cpu", 1, 0), ("cpu", 2, 1), ("cpu", 8, 2), ("cpu", 64, 2),
    ("mps", 8, 2),
])
def test_loader_workers_leave_a_cpu_to_the_network_and_give_a_gpu_many(device_type, cores, workers):
    assert loader_workers(device_type, cores) == workers


def test_processes_share_the_cores_with_at_least_one_thread_each():
    assert threads_per_process(16, 4) == 4 and threads_per_process(2, 4) == 1
    assert core_count() >= 1


@pytest.mark.parametrize("device_type, amp, bf16, chosen", [
    ("cuda", True, True, "bf16"), ("cuda", True, False, "fp16"), ("cuda", False, True, None),
    ("cpu", True, True, None), ("mps", True, True, None),
])
def test_training_mixed_precision_is_bf16_else_fp16_on_cuda_only(device_type, amp, bf16, chosen):
    assert choose_training_precision(device_type, amp, cuda_bf16=bf16) == chosen


def test_training_on_the_cpu_runs_in_float32():
    assert amp_dtype(torch.device("cpu"), True) is None
    assert (torch_dtype("bf16"), torch_dtype("fp16"), torch_dtype("fp32"), torch_dtype(None)) == \
           (torch.bfloat16, torch.float16, None, None)


@pytest.mark.parametrize("requested, device_type, cuda_bf16, cpu_bf16, chosen", [
    ("auto", "cuda", True, False, "bf16"), ("auto", "cuda", False, False, "fp16"),
    ("auto", "cpu", False, True, "bf16"), ("auto", "cpu", False, False, "fp32"), ("auto", "mps", True, True, "fp32"),
    ("fp16", "cpu", False, False, "fp16"), ("fp32", "cuda", True, True, "fp32"),
])
def test_render_precision_auto_is_bf16_where_native(requested, device_type, cuda_bf16, cpu_bf16, chosen):
    assert choose_render_precision(requested, device_type, cuda_bf16=cuda_bf16, cpu_native_bf16=cpu_bf16) == chosen


def test_an_unknown_render_precision_is_named():
    with pytest.raises(FeatureshiftError, match="Unknown precision 'fp8'"):
        resolve_precision(torch.device("cpu"), "fp8")
    assert resolve_precision(torch.device("cpu"), "fp32") == "fp32"


def test_autocast_runs_in_the_type_given_and_not_at_all_without_one():
    x = torch.ones(2, 2)
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), None):
        assert (x @ x).dtype == torch.float32
