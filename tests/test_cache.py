import pytest
import torch
from transformers import DynamicCache

import qjl
from qjl import QJLCache, QJLConfig
from qjl.runner import cache_kwarg

SMALL = QJLConfig(sketch_dim=64, outlier_sketch_dim=32, n_outliers=2, group_size=8, buffer_size=16, sink_tokens=3,
                  value_bits=2, value_group_size=32, center_keys=True)


def tiny_model(family: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    extra = {"qwen3": {"head_dim": 64}, "mistral": {"head_dim": 64, "sliding_window": None}}.get(family, {})
    config = AutoConfig.for_model(family, vocab_size=128, hidden_size=256, intermediate_size=256,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


def forward(model, ids, cache):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache}).logits


def test_nothing_compressed_is_exact(tiny_llama):
    """With a buffer longer than the sequence, every score is exact: logits equal the full cache's (this checks the
    attention path, GQA, masks, and that sinks and centring change no exact score)."""
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    config = SMALL.replace(buffer_size=512, group_size=8)
    full, compressed = DynamicCache(), QJLCache(tiny_llama, config)
    assert torch.allclose(forward(tiny_llama, ids[:, :30], full), forward(tiny_llama, ids[:, :30], compressed),
                          atol=1e-5)
    for t in range(30, 40):
        expected = forward(tiny_llama, ids[:, t:t + 1], full)
        got = forward(tiny_llama, ids[:, t:t + 1], compressed)
        assert torch.allclose(expected, got, atol=1e-4), t
    # A multi-token chunk on top of history goes through the compressed path too, with a causal mask.
    chunk = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(forward(tiny_llama, chunk, full), forward(tiny_llama, chunk, compressed), atol=1e-4)


def test_bookkeeping_over_several_flushes(tiny_llama):
    cache = QJLCache(tiny_llama, SMALL)
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(2))
    out = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=45, min_new_tokens=45,
                              do_sample=False, pad_token_id=0, **{cache_kwarg(tiny_llama): cache})
    assert out.shape == (2, 82)
    length = 81  # the last token is generated but not yet fed
    assert cache.get_seq_length() == length
    for layer in cache.layers:
        assert layer.sink_keys.shape[-2] == 3
        assert layer.buffer_keys.shape[-2] < SMALL.buffer_size
        assert layer.n_compressed % SMALL.group_size == 0 and layer.n_compressed >= 4 * SMALL.buffer_size - 16
        assert layer.state["signs"].shape == (2, 2, layer.n_compressed, 8)
        assert layer.state["outlier_idx"].shape == (2, 2, layer.n_compressed // 8, 2)
    assert cache.fp16_nbytes() == 2 * 2 * 2 * 2 * 64 * length * 2  # layers * (K,V) * batch * heads * dim * len * 2B


def test_crop_reset_and_reorder(tiny_llama):
    cache = QJLCache(tiny_llama, SMALL)
    ids = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(3))
    forward(tiny_llama, ids, cache)
    layer = cache.layers[0]
    # 3 sinks, then as many whole groups as fit: 56 compressed, 1 buffered.
    assert cache.get_seq_length() == 60 and layer.n_compressed == 56 and layer.buffer_keys.shape[-2] == 1
    cache.crop(-1)  # the buffer
    assert cache.get_seq_length() == 59 and layer.buffer_keys.shape[-2] == 0
    cache.crop(53)  # keep 53: into the compressed tokens, mid-group
    assert cache.get_seq_length() == 53 and layer.n_compressed == 50
    assert layer.state["signs"].shape[-2] == 50 and layer.state["outlier_idx"].shape[-2] == 7
    # Decoding goes on: the short group is completed with its own channels, then whole groups follow.
    for t in range(20):
        forward(tiny_llama, ids[:, t:t + 1], cache)
    assert cache.get_seq_length() == 73 and layer.n_compressed == 64 and layer.buffer_keys.shape[-2] == 6
    assert layer.n_compressed % SMALL.group_size == 0
    assert layer.state["outlier_idx"].shape[-2] == layer.n_compressed // SMALL.group_size
    before = {name: t.clone() for name, t in layer.compressed_state().items()}
    cache.reorder_cache(torch.tensor([1, 0]))
    for name, tensor in layer.compressed_state().items():
        assert torch.equal(tensor, before[name].flip(0)), name
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    forward(tiny_llama, ids[:, :20], cache)
    assert cache.get_seq_length() == 20


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_generate_families_batch_and_sampling(family):
    model = tiny_model(family)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    for do_sample in (False, True):
        cache = QJLCache(model, SMALL)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                             do_sample=do_sample, pad_token_id=0, **{cache_kwarg(model): cache})
        assert out.shape == (2, 60) and cache.get_seq_length() == 59
        assert cache.nbytes() < cache.fp16_nbytes() * 2  # float32 model: exact parts are 4-byte


def test_identical_rows_decode_identically(tiny_llama):
    row = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(6))
    out = tiny_llama.generate(row.repeat(2, 1), attention_mask=torch.ones(2, 50, dtype=torch.long),
                              max_new_tokens=30, do_sample=False, pad_token_id=0,
                              **{cache_kwarg(tiny_llama): QJLCache(tiny_llama, SMALL)})
    assert torch.equal(out[0], out[1])


def test_3bit_preset_is_five_times_smaller_at_8k(tiny_llama):
    """Real tensors of the embedded model's shape (30 layers, 3 KV heads, head dim 64) at 8k tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=64, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    with torch.device("meta"):
        shape_model = LlamaForCausalLM(config)
    preset = QJLConfig.preset("3bit", head_dim=64)
    assert preset.bits_per_fpn(64, num_layers=30) <= 3.2
    cache = QJLCache(shape_model, preset)
    gen = torch.Generator().manual_seed(7)
    for layer in cache.layers:
        keys = torch.randn(1, 3, 8192, 64, generator=gen, dtype=torch.float16)
        layer.update(keys, torch.randn(1, 3, 8192, 64, generator=gen, dtype=torch.float16))
    assert cache.get_seq_length() == 8192
    ratio = cache.nbytes() / cache.fp16_nbytes()
    assert ratio <= 1 / 5, ratio


def test_invalid_configs_name_the_field():
    for field, value in [("sketch_dim", 100), ("value_bits", 5), ("buffer_size", 40), ("n_outliers", -1),
                         ("value_group_size", 24), ("sink_tokens", -2), ("center_keys", "yes")]:
        with pytest.raises(ValueError, match=f"QJLConfig.{field}="):
            QJLConfig(**{field: value})
    with pytest.raises(ValueError, match="unknown QJL preset 'nope'.*paper"):
        QJLConfig.preset("nope")
    with pytest.raises(ValueError, match="n_outliers"):
        QJLConfig(n_outliers=64).check_head_dim(64)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="'gpt2' is not supported.*llama, mistral, qwen2, qwen3"):
        QJLCache(model, SMALL)


def test_empty_prompt_is_refused(tiny_llama):
    class Tokenizer:
        chat_template = None

    with pytest.raises(ValueError, match="prompt is empty"):
        next(qjl.run_side_by_side(tiny_llama, Tokenizer(), "   ", lambda m: QJLCache(m, SMALL)))


def test_buffer_keep_slides_a_window_of_exact_tokens(tiny_llama):
    config = SMALL.sliding()
    cache = QJLCache(tiny_llama, config)
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(9))
    forward(tiny_llama, ids[:, :40], cache)
    layer = cache.layers[0]
    for t in range(40, 90):
        forward(tiny_llama, ids[:, t:t + 1], cache)
        assert config.buffer_keep <= layer.buffer_keys.shape[-2] < config.buffer_size
        assert layer.n_compressed % config.group_size == 0
    assert cache.get_seq_length() == 90
    with pytest.raises(ValueError, match="QJLConfig.buffer_keep="):
        SMALL.replace(buffer_keep=SMALL.buffer_size)


def test_outlier_channels_centre_as_the_reference_did():
    """The mean is subtracted (in fp32) inside ``outlier_channels``: the same channels as for ``keys.float() - mean``,
    with whole groups and a short last one, and fp32 keys are not squared in place."""
    from qjl.keys import outlier_channels

    keys = torch.randn(2, 3, 45, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 2, 64)
    mean = keys.mean(-2, keepdim=True).bfloat16()
    for n in (32, 45):
        for x in (keys[:, :, :n], keys.bfloat16()[:, :, :n]):
            assert torch.equal(outlier_channels(x, 16, 4, mean), outlier_channels(x.float() - mean.float(), 16, 4))
        before = keys.clone()
        outlier_channels(keys[:, :, :n], 16, 4)
        assert torch.equal(keys, before)


def test_prompt_is_buffered_without_a_copy(tiny_llama):
    """The prompt waits in the buffer as given (a view of the incoming keys); what a flush keeps is cloned, and later
    tokens are concatenated, so the caller's tensors are never written."""
    layer = QJLCache(tiny_llama, SMALL).layers[0]
    keys, values = torch.randn(1, 2, 13, 64), torch.randn(1, 2, 13, 64)
    originals = keys.clone(), values.clone()
    layer.update(keys, values)
    assert layer.buffer_keys.data_ptr() == keys[:, :, SMALL.sink_tokens:].data_ptr()
    for _ in range(6):
        layer.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
    assert layer.n_compressed and torch.equal(keys, originals[0]) and torch.equal(values, originals[1])
