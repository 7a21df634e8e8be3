"""KIVI-style and TurboQuant-style caches and the preset registry (``qjl.kivi``, ``qjl.turboquant``,
``qjl.presets``)."""

import math

import pytest
import torch

import qjl
from qjl.kivi import KIVIConfig, KIVILayer
from qjl.presets import bits_per_number, get_preset
from qjl.runner import cache_kwarg
from qjl.turboquant import MSEQuantizer, TurboQuantConfig, TurboQuantLayer, lloyd_max

B, H, D = 1, 2, 64


def filled(layer, n, seed=0):
    """A layer holding ``n`` random tokens (keys with a few large channels, like real keys); returns them."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, n, D, generator=generator)
    keys[..., :3] *= 8
    values = torch.randn(B, H, n, D, generator=generator)
    layer.update(keys, values)
    return keys, values


def test_kivi_round_trip_within_half_a_step():
    config = KIVIConfig(bits=2, group_size=32, value_group_size=32, buffer_size=32)
    layer = KIVILayer(config)
    keys, values = filled(layer, 100)
    n = layer.n_compressed
    assert n == 96 and layer.buffer_keys.shape[-2] == 4
    # Asymmetric rounding: every number is within half a quantization step (+ fp16 rounding of scale and minimum).
    key_step = layer.state["key_scales"].float().repeat_interleave(32, dim=2)
    assert ((layer.dequantized_keys() - keys[:, :, :n]).abs() <= key_step / 2 * 1.01 + 1e-2).all()
    value_step = layer.state["value_scales"].float().repeat_interleave(32, dim=-1)
    assert ((layer.dequantized_values() - values[:, :, :n]).abs() <= value_step / 2 * 1.01 + 1e-2).all()
    # Per-channel key scales keep the large channels from swamping the others.
    assert key_step[..., 5].mean() < key_step[..., 0].mean() / 4


def test_kivi_crop_then_refill_keeps_group_statistics():
    layer = KIVILayer(KIVIConfig(bits=4, group_size=32, buffer_size=32))
    keys, values = filled(layer, 96)
    before = layer.dequantized_keys()[:, :, :40]
    layer.crop(40)
    assert layer.n_compressed == 40 and layer.state["key_scales"].shape[2] == 2
    more = torch.randn(B, H, 40, D, generator=torch.Generator().manual_seed(1))
    layer.update(more, more)
    assert layer.n_compressed == 64 and layer.get_seq_length() == 80
    assert torch.equal(layer.dequantized_keys()[:, :, :40], before)


def test_lloyd_max_gaussian_levels():
    # Max (1960): the optimal 1-bit levels are +-sqrt(2/pi); 2-bit +-0.4528, +-1.5104.
    assert lloyd_max(1) == pytest.approx([-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)], abs=1e-3)
    assert lloyd_max(2) == pytest.approx([-1.5104, -0.4528, 0.4528, 1.5104], abs=1e-3)
    # The sphere's coordinate law tends to the Gaussian as the dimension grows.
    assert lloyd_max(2, 4096) == pytest.approx(lloyd_max(2), abs=2e-3)
    assert lloyd_max(2, 64)[-1] < lloyd_max(2)[-1]


def test_turboquant_mse_round_trip_matches_its_distortion():
    rotation = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))[0]
    x = torch.randn(2000, D, generator=torch.Generator().manual_seed(1))
    for bits, bound in ((1, 0.37), (2, 0.12), (3, 0.035), (4, 0.0095)):
        quantizer = MSEQuantizer(rotation, bits)
        error = (quantizer.dequantize(*quantizer.quantize(x)) - x).square().sum(-1) / x.square().sum(-1)
        # The paper's distortion of the Lloyd-Max quantizer: about 0.36, 0.117, 0.03, 0.009 at 1..4 bits.
        assert error.mean() < bound


def test_turboquant_scores_unbiased_over_seeds():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, 32, D, generator=generator)
    query = torch.randn(1, 1, 1, D, generator=generator)
    exact = (query @ keys.transpose(-1, -2)).flatten()
    estimates, mse_only = [], []
    for seed in range(300):
        layer = TurboQuantLayer(TurboQuantConfig(bits=2, buffer_size=32, seed=seed))
        layer.update(keys, keys)
        estimates.append(layer.compressed_scores(query).flatten())
        rotated = layer.keys_mse.rotated(layer.state["key_codes"], layer.state["key_norms"])
        mse_only.append(((query @ layer.keys_mse.rotation.T) @ rotated.transpose(-1, -2)).flatten())
    estimates, mse_only = torch.stack(estimates), torch.stack(mse_only)
    spread = estimates.std(0) / math.sqrt(len(estimates))
    assert ((estimates.mean(0) - exact).abs() < 4 * spread + 1e-3).all()
    # The 1-bit MSE part alone shrinks scores towards zero (its bias the residual sketch removes).
    slope = (mse_only.mean(0) @ exact) / (exact @ exact)
    assert slope < 0.8


def test_turboquant_mse_keys_trade_bias_for_variance():
    """At the same bits the MSE key variant is biased (scores shrink) but its error is smaller: at a few bits the
    1-bit sketch's variance exceeds the bias it removes."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, 256, D, generator=generator)
    query = torch.randn(1, 1, 8, D, generator=generator)
    exact = query @ keys.transpose(-1, -2)
    errors = {}
    for unbiased in (True, False):
        layer = TurboQuantLayer(TurboQuantConfig(bits=3, buffer_size=256, unbiased_keys=unbiased))
        layer.update(keys, keys)
        assert ("residual_signs" in layer.state) == unbiased
        errors[unbiased] = (layer.compressed_scores(query) - exact).square().mean() / exact.square().mean()
    assert errors[False] < 0.7 * errors[True]
    assert errors[False] < 0.05  # about the 3-bit distortion (0.03)


def test_byte_accounting_from_real_tensors():
    for layer, per_token in ((KIVILayer(KIVIConfig(bits=2, buffer_size=32)), None),
                             (TurboQuantLayer(TurboQuantConfig(bits=3, buffer_size=32)), None),
                             (TurboQuantLayer(TurboQuantConfig(bits=3, buffer_size=32, unbiased_keys=False)), None)):
        filled(layer, 70)
        state = layer.compressed_state()
        held = sum(t.numel() * t.element_size() for t in state.values())
        exact = (layer.sink_keys.numel() + layer.buffer_keys.numel()) * 2 * 4  # float32 keys and values
        assert layer.nbytes() == held + exact
        assert layer.fp16_nbytes() == 2 * 2 * B * H * D * 70
        # The tensors hold exactly the analytic bits of the compressed tokens.
        assert 8 * held == pytest.approx(layer.config.bits_per_number(D) * 2 * B * H * D * layer.n_compressed)


def test_registry():
    presets = qjl.list_presets()
    for name in ("full", "qjl-paper", "qjl-3bit", "kivi-2bit", "kivi-4bit", "turboquant-3bit", "turboquant-4bit"):
        assert name in presets and {"method", "settings", "bits"} <= presets[name].keys()
    assert presets["kivi-2bit"]["bits"] == 3.0 and presets["full"]["bits"] == 16.0
    assert presets["qjl-3bit"]["bits"] == qjl.QJLConfig.preset("3bit", 64).bits_per_fpn(64)
    assert presets["turboquant-4bit"]["bits"] <= 4.5
    preset = get_preset("kivi-4bit")
    assert bits_per_number(preset.method, preset.settings(D), D) == 5.0
    with pytest.raises(ValueError, match="known presets: full, qjl-paper"):
        qjl.make_cache(None, "kivi-7bit")


@pytest.mark.parametrize("name", list(qjl.list_presets()))
def test_every_preset_decodes_like_full_on_a_tiny_model(tiny_llama, name):
    """Every preset builds a cache that transformers' ``generate`` accepts, with sane byte accounting."""
    ids = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(0))
    cache = qjl.make_cache(tiny_llama, name)
    out = tiny_llama.generate(ids, max_new_tokens=4, do_sample=False, **{cache_kwarg(tiny_llama): cache})
    assert out.shape == (1, 154) and cache.get_seq_length() == 153
    assert 0 < cache.nbytes() and cache.fp16_nbytes() == 2 * 2 * 2 * 2 * D * 153


# transformers' 2-bit quanto cache quantizes keys per token and re-quantizes the whole cache every 128 tokens; the
# Pareto study measured 0.28 top-1 for it, so it is expected to miss the bar.
SENSIBLE_CASES = [pytest.param(name, marks=pytest.mark.xfail(reason="2-bit per-token keys lose the argmax"))
                  if name == "hf-quanto-2bit" else name for name in qjl.list_presets()]


@pytest.mark.parametrize("name", SENSIBLE_CASES)
def test_every_preset_keeps_the_embedded_model_sensible(embedded, name):
    """On real text, with most of a 200-token prefix compressed, the next-token choices mostly agree with the full
    cache's, and greedy decoding gives words."""
    import assets
    from profiling.quality import teacher_forced
    from qjl.runner import run_side_by_side

    model, tokenizer = embedded
    ids = tokenizer(assets.long_text(), return_tensors="pt")["input_ids"][:, :220]
    forced = teacher_forced(model, ids, lambda m: qjl.make_cache(m, name), 200, 8)
    assert forced["top1"] >= 0.5
    *_, last = run_side_by_side(model, tokenizer, ids[:, :200], lambda m: qjl.make_cache(m, name), max_new_tokens=6)
    assert sum(c.isalpha() for c in last.text_compressed) >= 6
