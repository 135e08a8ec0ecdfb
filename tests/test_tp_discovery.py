"""The tensor-parallel layout read from the traced graph (zerofx/tp/discovery.py): Megatron's
regions of real models found without names, and what is not a region left whole."""
import pytest
import torch
from torch import nn

import zerofx
from models import Block, MLP, block_batch, make, mlp_batch
from zerofx.tp.layout import TPPlanError, TPShard, resolve_tp_layout


def _cfg(size=2):
    return zerofx.Config.from_dict({"tensor_parallel": {"size": size}})


def _styles(layout):
    return {c.module: (c.style, c.parts) for c in layout.choices}


@pytest.mark.parametrize("name", ["gpt2", "bert_mlm", "llama", "t5"])
def test_hugging_face_layouts_come_from_their_dummy_inputs(name):
    """No plan, no inputs: a Hugging Face model's own dummy_inputs are traced, and every
    layer's attention and MLP are found (GPT-2's Conv1D with its fused q|k|v, BERT's and
    T5's separate projections, Llama's grouped-query heads and gated MLP)."""
    pytest.importorskip("transformers")
    from hf_models import TP_LAYOUTS, make_hf

    layout = resolve_tp_layout(make_hf(name), _cfg())
    styles = _styles(layout)
    assert {m: styles.get(m) for m in TP_LAYOUTS[name]} == TP_LAYOUTS[name]
    assert all(c.reason.startswith("graph") for c in layout.choices)
    # every layer is split like the first (GPT-2, Llama: 2 layers; BERT: 1; T5: encoder
    # self-attention + MLP, decoder self- and cross-attention + MLP), plus the vocabulary;
    # position and token-type tables stay whole (Megatron splits the word embedding only)
    assert len(styles) == {"gpt2": 9, "bert_mlm": 7, "llama": 16, "t5": 17}[name]
    assert not any(k in m for m in styles for k in ("wpe", "position", "token_type"))


def test_through_inductor_the_layout_is_the_eager_one():
    """Under Inductor the passes run before its decompositions (which would take the
    cross-entropy apart): the vocabulary is split there too, like every layer."""
    pytest.importorskip("transformers")
    from hf_models import make_hf

    eager, inductor = (_styles(resolve_tp_layout(make_hf("llama"), zerofx.Config.from_dict(
        {"tensor_parallel": {"size": 2}, "zerofx": {"inductor": on}}))) for on in (False, True))
    assert inductor == eager and inductor["lm_head"] == ("colwise", 1)
    assert inductor["model.embed_tokens"] == ("vocab", 1)


def test_vocab_parallel_false_keeps_the_vocabulary_whole():
    pytest.importorskip("transformers")
    from hf_models import make_hf

    cfg = zerofx.Config.from_dict({"tensor_parallel": {"size": 2, "vocab_parallel": False}})
    styles = _styles(resolve_tp_layout(make_hf("llama"), cfg))
    assert "model.embed_tokens" not in styles and "lm_head" not in styles
    assert styles["model.layers.0.mlp.down_proj"] == ("rowwise", 1)


def test_gpt2_conv1d_shards_split_the_transposed_weight():
    pytest.importorskip("transformers")
    from hf_models import make_hf

    layout = resolve_tp_layout(make_hf("gpt2"), _cfg())
    # Conv1D keeps its weight as [in, out]: columns are dimension 1, rows dimension 0
    assert layout.shards["transformer.h.0.attn.c_attn.weight"] == TPShard(1, 3, (32, 96))
    assert layout.shards["transformer.h.0.attn.c_attn.bias"] == TPShard(0, 3, (96,))
    assert layout.shards["transformer.h.0.mlp.c_proj.weight"] == TPShard(0, 1, (128, 32))
    assert "transformer.h.0.mlp.c_proj.bias" not in layout.shards  # added once, whole


def test_a_head_count_under_an_unknown_name_is_read_from_the_graph():
    """The issue's block: heads stored as ``self.h`` and proj registered right before fc1.
    The module tree pairs proj with fc1 as an MLP; the graph shows attention and an MLP."""
    model = Block(head_attr="h")
    guessed = _styles(resolve_tp_layout(model, _cfg()))
    assert guessed.get("proj") == ("colwise", 1)  # the module tree's wrong guess
    layout = resolve_tp_layout(model, _cfg(), example_inputs=block_batch())
    assert _styles(layout) == {"qkv": ("colwise", 3), "proj": ("rowwise", 1),
                               "fc1": ("colwise", 1), "fc2": ("rowwise", 1),
                               "emb": ("vocab", 1), "head": ("colwise", 1)}  # vocabulary


def test_a_linear_whose_features_meet_a_norm_is_left_whole():
    """fc1's output goes through a LayerNorm over its features: no Megatron region."""
    model, batch = make("mlp_norm")
    with pytest.raises(TPPlanError, match="no Linear layer to split"):
        resolve_tp_layout(model, _cfg(), example_inputs=batch)


def test_a_layer_called_twice_is_one_region():
    """One MLP applied twice (a loop of shared blocks): each weight's every use agrees."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP(16, 32, 16)

        def forward(self, x, y):
            h = x + self.mlp.fc2(torch.relu(self.mlp.fc1(x)))
            return ((h + self.mlp.fc2(torch.relu(self.mlp.fc1(h))))[:, :8] - y).pow(2).mean()

    layout = resolve_tp_layout(Twice(), _cfg(), example_inputs=mlp_batch())
    assert _styles(layout) == {"mlp.fc1": ("colwise", 1), "mlp.fc2": ("rowwise", 1)}


def test_indivisible_features_are_not_split():
    layout = resolve_tp_layout(MLP(16, 32, 8), _cfg(4), example_inputs=mlp_batch())
    assert _styles(layout) == {"fc1": ("colwise", 1), "fc2": ("rowwise", 1)}
    with pytest.raises(TPPlanError, match="no Linear layer to split"):
        resolve_tp_layout(MLP(16, 30, 8), _cfg(4), example_inputs=mlp_batch())


def test_inputs_the_model_rejects_name_the_model_error_and_the_way_out():
    with pytest.raises(TPPlanError, match=r"example_inputs=.*tensor_parallel.plan") as e:
        resolve_tp_layout(MLP(), _cfg(), example_inputs=(torch.zeros(2, 5), torch.zeros(2, 8)))
    assert "RuntimeError" in str(e.value)  # the model's own complaint about the shape


def test_discovered_split_computes_what_the_whole_model_computes():
    """The discovered layout, applied by hand to plain torch: rank pieces of the column-
    parallel output, through the block, summed after the row-parallel layer, equal the
    whole MLP (the property Megatron's split rests on)."""
    torch.manual_seed(0)
    model = MLP(16, 32, 8)
    x, _ = mlp_batch()
    layout = resolve_tp_layout(model, _cfg(), example_inputs=mlp_batch())
    sd = {n: p.detach() for n, p in model.named_parameters()}
    piece = {n: [s.local_piece(sd[n], 2, r) for r in range(2)] for n, s in layout.shards.items()}
    partial = [torch.nn.functional.gelu(x @ piece["fc1.weight"][r].T + piece["fc1.bias"][r])
               @ piece["fc2.weight"][r].T for r in range(2)]
    want = model.fc2(torch.nn.functional.gelu(model.fc1(x)))
    torch.testing.assert_close(partial[0] + partial[1] + sd["fc2.bias"], want)


def test_weights_the_layout_cannot_split_are_named_with_why(caplog):
    """GPT-2's 2 (query) heads cannot be split over 4 ranks: attention stays whole, said in
    a warning and in the plan dump (not silently), while its MLPs are split. (Key/value
    heads fewer than the ranks are held by rank groups: test_tp_gqa_groups.py.)"""
    pytest.importorskip("transformers")
    from hf_models import make_hf
    from zerofx.plan import make_plan

    model = make_hf("gpt2")
    cfg = zerofx.Config.from_dict({"tensor_parallel": {"size": 4}})
    with caplog.at_level("WARNING", logger="zerofx.tp.layout"):
        layout = resolve_tp_layout(model, cfg)
    whole = dict(layout.left_whole)
    assert "aten.view" in whole["transformer.h.0.attn.c_attn.weight"]
    assert "fewer heads than ranks" in whole["transformer.h.0.attn.c_attn.weight"]
    assert "layer_norm" in whole["transformer.h.0.attn.c_proj.weight"]
    assert _styles(layout)["transformer.h.0.mlp.c_proj"] == ("rowwise", 1)
    assert "leaves 4 projection weight(s) whole" in caplog.text
    named = [(n, p) for n, p in model.named_parameters()]
    text = make_plan(named, cfg, rank=0, world_size=4, tp_layout=layout).describe()
    assert "left whole" in text and "transformer.h.1.attn.c_attn.weight" in text
    assert resolve_tp_layout(model, zerofx.Config.from_dict(
        {"tensor_parallel": {"size": 2}})).left_whole == ()


def _uneven_models():
    import transformers as T

    torch.manual_seed(0)
    llama = T.LlamaForCausalLM(T.LlamaConfig(  # a vocabulary of 255: odd
        vocab_size=255, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    bert = T.BertForSequenceClassification(T.BertConfig(  # 5 labels
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=5, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    ids = torch.randint(0, 64, (2, 8))
    return {"llama": (llama, {"input_ids": ids, "labels": ids}),
            "bert_cls": (bert, {"input_ids": ids, "labels": torch.tensor([0, 4])})}


def test_sizes_that_do_not_divide_are_kept_whole_with_the_reason():
    """A 255-row vocabulary over 2 ranks: the LM head stays whole and plan.txt says why (it
    used to be split into 127/128-row pieces and crash at the first forward); the attention
    and MLP are still split."""
    pytest.importorskip("transformers")
    model, example = _uneven_models()["llama"]
    whole = "lm_head.weight"
    layout = resolve_tp_layout(model, _cfg(2), example_inputs=example)
    why = dict(layout.left_whole)
    assert "do not divide over 2 ranks" in why[whole]
    assert whole.rsplit(".", 1)[0] not in _styles(layout)
    split = [m for m, (style, _) in _styles(layout).items() if style == "colwise"]
    assert any("q_proj" in m or "query" in m for m in split), _styles(layout)


def _uneven_body(rank, world, name):
    model, example = _uneven_models()[name]
    engine, *_ = zerofx.initialize(model=model, example_inputs=example, config={
        "train_micro_batch_size_per_gpu": 2, "tensor_parallel": {"size": 2},
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}})
    losses = []
    for _ in range(2):
        out = engine(**example)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss))
    return losses


def test_a_five_label_head_is_split_only_where_it_divides():
    # BERT's classifier [5, 32]: row-parallel over its 32 input features, never 5 outputs
    pytest.importorskip("transformers")
    model, example = _uneven_models()["bert_cls"]
    styles = _styles(resolve_tp_layout(model, _cfg(2), example_inputs=example))
    assert styles["classifier"] == ("rowwise", 1)
    assert styles["bert.encoder.layer.0.attention.self.query"] == ("colwise", 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "bert_cls"])
def test_uneven_models_train_on_two_ranks_as_on_one(name):
    from multiproc import run_ranks

    model, example = _uneven_models()[name]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    want = []
    for _ in range(2):
        loss = model(**example).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        want.append(float(loss))
    for got in run_ranks(_uneven_body, 2, args=(name,)):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def _task_models():
    import transformers as T

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
    return {
        "roberta_cls": T.RobertaForSequenceClassification(T.RobertaConfig(
            vocab_size=64, num_labels=3, **small)),
        "vit_cls": T.ViTForImageClassification(T.ViTConfig(
            image_size=16, patch_size=8, num_labels=4, **small)),
        "whisper": T.WhisperForConditionalGeneration(T.WhisperConfig(
            vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
            decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
            max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1, dropout=0.0)),
    }


@pytest.mark.parametrize("name, split", [
    ("roberta_cls", "roberta.encoder.layer.0.attention.self.query"),
    ("vit_cls", "vit.layers.0.attention.q_proj"),
    ("whisper", "model.encoder.layers.0.self_attn.q_proj"),
])
def test_task_models_are_traced_on_inputs_made_for_their_task(name, split):
    """No example_inputs: a sequence classifier gets one label per sequence (not
    labels=input_ids), an image model pixel values of its config's size, Whisper audio
    features; their layouts are found (each used to fail in the model's own code)."""
    pytest.importorskip("transformers")
    layout = resolve_tp_layout(_task_models()[name], _cfg(2))
    assert _styles(layout)[split] == ("colwise", 1)
