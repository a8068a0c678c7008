"""The FLUX.2 model: shapes -> config, and the split stages compute what the whole model does."""

import pytest
import torch

from comfy_mesh.splitter.errors import ModelFormatError
from comfy_mesh.splitter.flux2.config import KNOWN_SIZES, Flux2Config
from comfy_mesh.splitter.flux2.random_weights import checkpoint_shapes, random_checkpoint
from comfy_mesh.splitter.flux2.stage import Flux2Stage, image_ids, module_keys, text_ids
from comfy_mesh.splitter.model_file import open_model
from comfy_mesh.splitter.plan import BlockRange

from conftest import TINY, TINY_GUIDED


@pytest.mark.parametrize("name", ["flux2-dev", "flux2-klein-9b", "flux2-klein-4b", "tiny"])
def test_config_inferred_from_shapes(name):
    config = KNOWN_SIZES[name]
    assert Flux2Config.from_shapes(checkpoint_shapes(config)) == config


def test_real_model_sizes_from_shapes():
    # Parameter counts the model cards state, recomputed from our key/shape table.
    def billions(name):
        return sum(torch.Size(s).numel() for s in checkpoint_shapes(KNOWN_SIZES[name]).values()) / 1e9
    assert 32.0 < billions("flux2-dev") < 32.5
    assert 8.9 < billions("flux2-klein-9b") < 9.4  # "9B": transformer only (the text encoder is separate)
    assert 3.7 < billions("flux2-klein-4b") < 4.1


def test_not_flux2_is_refused():
    with pytest.raises(ModelFormatError, match="not a FLUX.2"):
        Flux2Config.from_shapes({"img_in.weight": (256, 128)})


def _inputs(config, B=2, h=6, w=5, n_txt=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(B, h * w, config.in_channels, generator=g),
                txt=torch.randn(B, n_txt, config.context_dim, generator=g),
                timestep=torch.tensor([0.9, 0.3][:B]), img_ids=image_ids(B, h, w), txt_ids=text_ids(B, n_txt),
                guidance=torch.tensor([3.5, 4.0][:B]) if config.guidance_embed else None)


def _loader(state, log=None):
    def load(keys):
        if log is not None:
            log.extend(keys)
        return {k: state[k].clone() for k in keys}
    return load


@pytest.mark.parametrize("config", [TINY, TINY_GUIDED], ids=["klein-like", "dev-like"])
def test_every_cut_equals_the_whole_model(config):
    state = random_checkpoint(config, seed=3)
    x = _inputs(config)
    whole = Flux2Stage(config, BlockRange(0, config.n_blocks), first=True, last=True, load_weights=_loader(state))
    expected = whole(**x)
    assert expected.shape == (2, 30, config.out_channels) and torch.isfinite(expected).all()
    for cut in range(config.n_blocks + 1):
        front = Flux2Stage(config, BlockRange(0, cut), first=True, last=False, load_weights=_loader(state))
        tail = Flux2Stage(config, BlockRange(cut, config.n_blocks), first=False, last=True, load_weights=_loader(state))
        ctx = front.context(x["timestep"], x["guidance"], x["txt_ids"], x["img_ids"])
        hidden = front.run_blocks(front.embed(x["img"], x["txt"]), ctx)
        assert hidden.shape == (2, 7 + 30, config.hidden_size)
        ctx_tail = tail.context(x["timestep"], x["guidance"], x["txt_ids"], x["img_ids"])
        out = tail.finish(tail.run_blocks(hidden, ctx_tail), ctx_tail)
        torch.testing.assert_close(out, expected, rtol=0, atol=0, msg=f"cut at block {cut}")


def test_stage_loads_only_what_it_hosts():
    state = random_checkpoint(TINY, seed=3)
    loaded = []
    Flux2Stage(TINY, BlockRange(3, 5), first=False, last=True, load_weights=_loader(state, loaded))
    prefixes = {k.rsplit(".", 1)[0].split(".")[0] + ("." + k.split(".")[1] if "blocks" in k else "") for k in loaded}
    assert prefixes == {"single_blocks.1", "single_blocks.2", "time_in", "single_stream_modulation", "final_layer"}
    assert not any(k.startswith(("img_in", "txt_in", "double")) for k in loaded)


def test_set_range_moves_live_in_both_directions():
    state = random_checkpoint(TINY, seed=5)
    x = _inputs(TINY, B=1)
    whole = Flux2Stage(TINY, BlockRange(0, TINY.n_blocks), first=True, last=True, load_weights=_loader(state))
    expected = whole(**x)
    loaded = []
    tail = Flux2Stage(TINY, BlockRange(4, 5), first=False, last=True, load_weights=_loader(state, loaded))
    front = Flux2Stage(TINY, BlockRange(0, 4), first=True, last=False, load_weights=_loader(state))
    for cut in (1, 3, 0, 5, 2):  # grow, shrink, everything, nothing, back
        loaded.clear()
        change = tail.set_range(BlockRange(cut, 5))
        front.set_range(BlockRange(0, cut))
        assert set(tail.hosted_modules()) >= {f"single_blocks.{b - 2}" for b in range(max(cut, 2), 5)}
        assert all(k.split(".")[0] not in ("img_in", "txt_in") for k in loaded)
        if change.dropped:
            assert not any(name in tail.hosted_modules() for name in change.dropped)
        ctx = front.context(x["timestep"], None, x["txt_ids"], x["img_ids"])
        hidden = front.run_blocks(front.embed(x["img"], x["txt"]), ctx)
        ctx2 = tail.context(x["timestep"], None, x["txt_ids"], x["img_ids"])
        torch.testing.assert_close(tail.finish(tail.run_blocks(hidden, ctx2), ctx2), expected, rtol=0, atol=0)
    # Hosting nothing but the final layer frees every block's weights.
    tail.set_range(BlockRange(5, 5))
    assert tail.weight_bytes() < 0.2 * whole.weight_bytes()


def test_parked_blocks_come_back_from_cpu_without_reading_the_file():
    state = random_checkpoint(TINY, seed=5)
    loaded = []
    stage = Flux2Stage(TINY, BlockRange(0, 5), first=True, last=True, load_weights=_loader(state, loaded),
                       park_on_cpu=True)
    stage.set_range(BlockRange(0, 2))
    loaded.clear()
    stage.set_range(BlockRange(0, 5))
    assert loaded == []


def test_open_model_reads_prefixed_checkpoint(tiny_guided_checkpoint):
    model = open_model(tiny_guided_checkpoint)
    try:
        assert model.config == TINY_GUIDED and model.family == "flux2" and len(model.fingerprint) == 64
        stage = model.stage(BlockRange(4, 5), first=False, last=True)
        assert "single_blocks.2" in stage.hosted_modules()
        file_weight = model.checkpoint.load(["final_layer.linear.weight"])["final_layer.linear.weight"]
        assert torch.equal(stage.parts["final_layer"].linear.weight, file_weight)
        assert set(module_keys(TINY_GUIDED, "final_layer")) == {"final_layer.linear.weight",
                                                               "final_layer.adaLN_modulation.1.weight"}
    finally:
        model.close()


def test_a_failed_move_leaves_the_stage_as_it_was():
    """Loading new blocks fails (a full GPU): the stage still hosts and computes its old range."""
    state = random_checkpoint(TINY, seed=5)
    x = _inputs(TINY, B=1)
    fail = {"on": False}

    def load(keys):
        if fail["on"]:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return {k: state[k].clone() for k in keys}

    tail = Flux2Stage(TINY, BlockRange(3, 5), first=False, last=True, load_weights=load)
    front = Flux2Stage(TINY, BlockRange(0, 3), first=True, last=False, load_weights=_loader(state))
    ctx = front.context(x["timestep"], None, x["txt_ids"], x["img_ids"])
    hidden = front.run_blocks(front.embed(x["img"], x["txt"]), ctx)
    ctx2 = tail.context(x["timestep"], None, x["txt_ids"], x["img_ids"])
    before = tail.finish(tail.run_blocks(hidden, ctx2), ctx2)
    modules = tail.hosted_modules()
    fail["on"] = True
    with pytest.raises(torch.OutOfMemoryError):
        tail.set_range(BlockRange(0, 5))  # would need the double blocks and their modulation
    assert tail.blocks == BlockRange(3, 5) and tail.hosted_modules() == modules
    assert not any(p.is_meta for p in tail.parameters())
    torch.testing.assert_close(tail.finish(tail.run_blocks(hidden, ctx2), ctx2), before, rtol=0, atol=0)
