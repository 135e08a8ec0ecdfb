"""zerofx-plan's ZeRO-3 model-state rows against DeepSpeed's own estimator
(deepspeed/runtime/zero/stage3.py, 0.19: model_to_params and
estimate_zero3_model_states_mem_needs, which estimate_zero3_model_states_mem_needs_all_live
chains), transcribed below, where the two count the same things (docs/memory.md):

    total_params         the parameters, a shared one once (model_to_params: by data_ptr)
    largest_layer_params the most parameters one module holds itself (recurse=False)
    no offload, per GPU  4 x largest (the largest layer's 16-bit parameters gathered and its
                         16-bit gradients) + 18 Psi/N: 2 (16-bit parameter shard) + 4 (fp32
                         master) + 4 (the fp32 gradient partition the optimizer reads:
                         _prepare_fp32_grad_for_sub_group) + 8 (Adam's moments)
    cpu_offload, per GPU 4 x largest + 2 Psi/N; per CPU (zero_init) 16 Psi x gpus per node
                         / nodes x additional_buffer_factor: master, fp32 gradients, moments
    cpu_offload_params   not compared: zerofx has no offload_param device cpu (a config
                         with it is read as device none, with a note)

zerofx reduces and keeps the gradient shard in the compute dtype unless
data_types.grad_accum_dtype is fp32: its optimizer reads the 16-bit shard, so by default its
model states are 16 Psi/N, DeepSpeed's 18 less the fp32 gradient copy's 2 Psi/N. The functions
tested are those zerofx.planner.plan_rank calls (make_plan, model_states, gathered_bytes,
offload_facts); the model is built for real here (tiny), as DeepSpeed's counter needs storage.
"""
import pytest
import torch

from zerofx.plan import make_plan
from zerofx.planner.memory import gathered_bytes, model_states
from zerofx.planner.offload import offload_facts

transformers = pytest.importorskip("transformers")

WORLD = 8  # every weight of the model below is a multiple of 8 elements: no padding


def ds_model_to_params(model):
    """deepspeed.runtime.zero.stage3.model_to_params, transcribed."""
    total = sum(dict((p.data_ptr(), p.numel()) for p in model.parameters()).values())
    largest = 0
    for m in model.modules():
        largest = max(largest, sum(p.numel() for p in m.parameters(recurse=False)))
    return total, largest


def ds_estimate(total, largest, *, gpus_per_node, nodes, cpu_offload, buffer_factor=1.5):
    """estimate_zero3_model_states_mem_needs, transcribed: (cpu_mem, gpu_mem) with
    zero_init and without parameter offload (zerofx has no offload_param device cpu)."""
    gpus = nodes * gpus_per_node
    largest_mem = 4 * largest
    if cpu_offload:
        return (int(total * 16 * (1 / nodes) * buffer_factor),
                int(largest_mem + int(2 * total / gpus)))
    return (int(largest * 4 * gpus_per_node * buffer_factor),
            int(largest_mem + int(18 * total / gpus)))


def _llama(tied):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied))


def _zerofx(model, *, fp32_grads=False, offload=False):
    """(plan, model-state rows, gathered bytes, offload facts) of rank 0 of WORLD, ZeRO-3,
    bf16, with DeepSpeed's estimator's assumptions: no parameter kept whole (persistence
    threshold 0), one parameter per gather (so the gathered set is one layer's: a Llama
    module holds one weight) and no more live than it (max_live 1: at least the gathered bucket)."""
    cfg = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                 "stage3_max_live_parameters": 1,
                                 "stage3_prefetch_bucket_size": 1,
                                 "reduce_bucket_size": 1}}
    if fp32_grads:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    from zerofx.planner import read_config
    config = read_config(cfg, gpu=offload)  # ZeRO-Offload: the parameters on a GPU
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    plan = make_plan(named, config, rank=0, world_size=WORLD)
    facts = offload_facts(plan, config, gpu=offload)
    return plan, model_states(plan, config, facts), gathered_bytes(plan, config, facts), facts


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_counts_are_deepspeeds(tied):
    model = _llama(tied)
    total, largest = ds_model_to_params(model)
    plan, _, gathered, _ = _zerofx(model)
    assert plan.numel == total  # the tied embedding counted once by both
    assert max(b.numel for b in plan.buckets) == largest
    assert gathered == 2 * largest  # the 16-bit half of DeepSpeed's 4 x largest


@pytest.mark.parametrize("tied", [True, False])
def test_no_offload_model_states_are_deepspeeds_18_psi_over_n(tied):
    model = _llama(tied)
    total, largest = ds_model_to_params(model)
    _, gpu = ds_estimate(total, largest, gpus_per_node=WORLD, nodes=1, cpu_offload=False)
    # DeepSpeed's 4 x largest: the gathered layer's 16-bit parameters and gradients
    layer = 2 * largest + 2 * largest
    _, fp32, _, _ = _zerofx(model, fp32_grads=True)
    states = fp32["parameters"] + fp32["gradients"] + fp32["optimizer"]
    assert states + layer == gpu  # fp32 gradient shard: DeepSpeed's 18 bytes exactly
    _, bf16, _, _ = _zerofx(model)
    states16 = bf16["parameters"] + bf16["gradients"] + bf16["optimizer"]
    assert states16 + layer == gpu - 2 * total // WORLD  # 16 Psi/N: no fp32 gradient copy
    assert bf16["parameters"] == fp32["parameters"] == 2 * total // WORLD


@pytest.mark.parametrize("fp32_grads", [True, False])
def test_cpu_offload_rows_against_deepspeeds(fp32_grads):
    """offload_optimizer cpu with the parameters on a GPU. DeepSpeed's GPU side is the
    16-bit parameter shard; zerofx's parameters row is the same, and it also keeps the
    reduced gradient shard on the device (copied to the host each step). DeepSpeed's host
    side per rank, without its 1.5 safety factor, is 16 Psi/N (fp32 master, gradients,
    moments); zerofx's is the state, the gradient shard in its reduce dtype and the updated
    16-bit shard staged for the copy back."""
    model = _llama(tied=False)
    total, largest = ds_model_to_params(model)
    cpu, gpu = ds_estimate(total, largest, gpus_per_node=1, nodes=WORLD, cpu_offload=True,
                           buffer_factor=1.0)
    _, rows, _, facts = _zerofx(model, fp32_grads=fp32_grads, offload=True)
    assert facts.optimizer_host and rows["optimizer"] == 0
    assert rows["parameters"] + 4 * largest == gpu
    grad = 4 if fp32_grads else 2
    assert rows["gradients"] == grad * total // WORLD
    assert facts.host == cpu - (4 - grad) * total // WORLD + 2 * total // WORLD
