"""The node inside real ComfyUI: ComfyUI's loader, our node, ComfyUI's sampler, a real daemon.

Runs when COMFYUI_PATH points at a ComfyUI checkout whose requirements are installed in
this Python; skips with that reason otherwise (CI has no ComfyUI: test_comfyui_node.py
covers what needs none). ComfyUI runs on the CPU here unless it finds a GPU.

What it checks, each against the same sampling with the unsplit model:

- a tiny FLUX.2 checkpoint in ComfyUI's key format (Klein layout without prefix, dev
  layout with guidance under `model.diffusion_model.`) loads through UNETLoader; the node
  splits it to a daemon on loopback serving the same file; KSampler (cfg > 1, so cond
  and uncond go through the split batched) gives the same latents within 1e-5 with
  `raw`, and within the codec's stated error with `cpu`;
- the remote blocks' weights are not in the module tree ComfyUI loads while sampling,
  ComfyUI's memory manager is told the front's size only, and those weights never got
  ComfyUI's "loaded" mark;
- changing n_blocks_remote between runs, down and up, works without a restart;
- a plan moved on the daemon mid-run (as the panel does) applies at the next step, also
  from an all-local split (n_blocks_remote 0) back up;
- a daemon serving another file is refused with a message naming both files.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch

from daemon_helpers import NoPeers, running_daemon

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
STEPS = 3
CFG = 2.0  # > 1: ComfyUI batches cond and uncond into one model call (batch 2)
RAW_TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def no_real_discovery():
    """The node's peer dropdown would browse mDNS on every interface: keep tests off the real network."""
    from comfy_mesh.comfyui import peers

    peers.DISCOVERY.set_source(NoPeers())
    yield
    peers.DISCOVERY.set_source(None)


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI's modules, imported from COMFYUI_PATH (on the CPU when there is no GPU)."""
    if not COMFYUI_PATH:
        pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout whose requirements are installed in "
                    "this Python to run the ComfyUI integration test")
    root = pathlib.Path(COMFYUI_PATH).expanduser().resolve()
    if not (root / "comfy" / "model_patcher.py").is_file():
        pytest.skip(f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout (no comfy/model_patcher.py)")
    sys.path.insert(0, str(root))
    try:
        from comfy.cli_args import args

        if not torch.cuda.is_available():
            args.cpu = True
        import comfy.model_management
        import comfy.sample
        import folder_paths
        import nodes
    except Exception as exc:  # missing requirements show up as any kind of error at import
        pytest.skip(f"ComfyUI at {root} cannot be imported ({type(exc).__name__}: {exc}); install its "
                    "requirements.txt into this Python")

    class Comfy:
        pass

    c = Comfy()
    c.root, c.nodes, c.folder_paths, c.mm, c.sample = root, nodes, folder_paths, comfy.model_management, comfy.sample
    c.commit = _git_commit(root)
    yield c
    from comfy_mesh.comfyui.split_model import close_all

    close_all()
    comfy.model_management.unload_all_models()


def _git_commit(root: pathlib.Path) -> str:
    """`<commit> (v<version>)` of the checkout, as far as it can be told."""
    import subprocess

    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown commit"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown commit"
    version = "?"
    try:
        text = (root / "comfyui_version.py").read_text()
        version = text.split("__version__", 1)[1].split("=", 1)[1].strip().split()[0].strip("\"'")
    except (OSError, IndexError):
        pass
    return f"{commit} (v{version})"


def _load(comfy, checkpoint: str):
    """UNETLoader, as the graph's Load Diffusion Model node runs it."""
    path = pathlib.Path(checkpoint)
    comfy.folder_paths.add_model_folder_path("diffusion_models", str(path.parent))
    (model,) = comfy.nodes.UNETLoader().load_unet(path.name, "default")
    return model


def _conds(context_dim: int, guidance: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    extra = {"guidance": 4.0} if guidance else {}
    pos = [[torch.randn(1, 20, context_dim, generator=g), dict(extra)]]
    neg = [[torch.randn(1, 20, context_dim, generator=g), dict(extra)]]
    return pos, neg


def _ksampler(comfy, model, pos, neg, size=8):
    latent = {"samples": torch.zeros(1, 128, size, size)}
    (out,) = comfy.nodes.KSampler().sample(model, 42, STEPS, CFG, "euler", "simple", pos, neg, latent, denoise=1.0)
    return out["samples"]


def _sample_with_callback(comfy, model, pos, neg, callback, size=8):
    latent = torch.zeros(1, 128, size, size)
    noise = comfy.sample.prepare_noise(latent, 42)
    return comfy.sample.sample(model, noise, STEPS, CFG, "euler", "simple", pos, neg, latent, denoise=1.0,
                               callback=callback, disable_pbar=True, seed=42)


def _node():
    from comfy_mesh.comfyui import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS["ComfyMeshSplitFlux2"]()


def _split(model, server, n_remote, codec="raw", key="itest"):
    host_port = server.endpoint.removeprefix("tcp://")
    (split,) = _node().split(model, "manual address", host_port, n_remote, codec, 7.0, unique_id=key)
    return split


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _controller(split):
    from comfy_mesh.comfyui.split_model import controller_of

    return controller_of(split)


def _tree_names(patcher) -> set[str]:
    return {n for n, _ in patcher.model.diffusion_model.named_parameters()}


def _marked_loaded(module) -> bool:
    return any(getattr(m, "comfy_patched_weights", False) for m in module.modules())


@pytest.fixture(scope="module")
def klein(comfy, tiny_checkpoint):
    return _load(comfy, tiny_checkpoint)


@pytest.fixture(scope="module")
def klein_reference(comfy, klein):
    pos, neg = _conds(96, guidance=False)
    return pos, neg, _ksampler(comfy, klein, pos, neg)


def test_comfyui_commit_is_reported(comfy, record_property):
    record_property("comfyui_commit", comfy.commit)
    print(f"ComfyUI at {comfy.root}, commit {comfy.commit}")


@pytest.mark.parametrize("layout", ["klein", "dev"])
def test_split_equals_unsplit_in_comfyui(comfy, layout, tiny_checkpoint, tiny_guided_checkpoint, record_property):
    """Klein layout (no guidance, bare keys) and dev layout (guidance, ComfyUI's prefix)."""
    checkpoint = tiny_checkpoint if layout == "klein" else tiny_guided_checkpoint
    model = _load(comfy, checkpoint)
    params = model.model.diffusion_model.params
    assert params.guidance_embed == (layout == "dev")
    pos, neg = _conds(params.context_in_dim, guidance=params.guidance_embed)
    expected = _ksampler(comfy, model, pos, neg)
    with running_daemon(checkpoint, blocks=0, node_id=f"node-{layout}") as server:
        split = _split(model, server, 3, key=f"itest-{layout}")
        got = _ksampler(comfy, split, pos, neg)
        link = _controller(split).link
    rel = _rel(got, expected)
    record_property(f"rel_err_raw_{layout}", rel)
    print(f"{layout}: split (3 of 5 blocks remote, raw) vs unsplit: relative error {rel:.3e}")
    assert rel <= RAW_TOL
    assert len(link.records) == STEPS and all(r.batch == 2 for r in link.records)  # cond + uncond batched
    assert all(r.n_blocks_remote == 3 for r in link.records)


def test_remote_weights_stay_off_the_comfyui_device(comfy, klein, klein_reference, tiny_checkpoint):
    pos, neg, expected = klein_reference
    full = klein.model_size()
    with running_daemon(tiny_checkpoint, blocks=0) as server:
        split = _split(klein, server, 3, key="itest-vram")
        away = {a.block_name: a for a in split.object_patches["diffusion_model.single_blocks"]
                if hasattr(a, "real")}
        assert set(away) == {"single_blocks.0", "single_blocks.1", "single_blocks.2"}
        away_bytes = sum(a.weight_bytes for a in away.values()) + split.object_patches[
            "diffusion_model.final_layer"].weight_bytes
        seen = []

        def during(step, x0, x, total):  # while ComfyUI has the model loaded for sampling
            seen.append((_tree_names(split), split.model.model_loaded_weight_memory,
                         [_marked_loaded(a.real) for a in away.values()],
                         _marked_loaded(split.model.diffusion_model.double_blocks[0]),
                         [lm.model_memory() for lm in comfy.mm.current_loaded_models if lm.model is split]))

        got = _sample_with_callback(comfy, split, pos, neg, during)
    assert _rel(got, expected) <= RAW_TOL
    assert len(seen) == STEPS
    names, loaded_bytes, away_marked, front_marked, budget = seen[-1]
    # The tree ComfyUI loads (and moves to its device) holds no weight of a remote block ...
    assert not any(n.startswith(("single_blocks.", "final_layer.")) for n in names)
    assert any(n.startswith("double_blocks.1.") for n in names)
    # ... ComfyUI's memory manager budgets and loads the front only ...
    assert split.model_size() == full - away_bytes
    assert loaded_bytes == full - away_bytes and budget == [full - away_bytes]
    # ... and marked the front's modules loaded, never the remote ones.
    assert front_marked and not any(away_marked)
    # Between generations the model's tree is whole again, for LoRA loaders and other patchers.
    assert "single_blocks.2.linear2.weight" in _tree_names(split)


def test_n_blocks_remote_down_then_up(comfy, klein, klein_reference, tiny_checkpoint, record_property):
    pos, neg, expected = klein_reference
    full = klein.model_size()
    sizes = {}
    with running_daemon(tiny_checkpoint, blocks=0) as server:
        for n_remote in (3, 1, 4, 0, 5):  # down, up, none, all
            split = _split(klein, server, n_remote, key="itest-move")  # the node re-run with a new value
            loaded = []
            got = _sample_with_callback(comfy, split, pos, neg,
                                        lambda *a: loaded.append(split.model.model_loaded_weight_memory))
            rel = _rel(got, expected)
            record_property(f"rel_err_raw_{n_remote}_remote", rel)
            print(f"n_blocks_remote={n_remote}: relative error {rel:.3e}, ComfyUI loaded {loaded[-1]} of {full} bytes")
            assert rel <= RAW_TOL, n_remote
            sizes[n_remote] = loaded[-1]
            assert server.host.hosted == (None if n_remote == 0 else _range(5 - n_remote, 5))
    assert sizes[0] == full
    assert sizes[5] < sizes[4] < sizes[3] < sizes[1] < sizes[0]


def _range(a, b):
    from comfy_mesh.splitter.plan import BlockRange

    return BlockRange(a, b)


def test_cpu_codec_within_its_stated_error(comfy, klein, klein_reference, tiny_checkpoint, record_property):
    from comfy_mesh.comfyui.split_model import make_split

    pos, neg, expected = klein_reference
    with running_daemon(tiny_checkpoint, blocks=0) as server:
        split = make_split(klein, peer="manual address", address=server.endpoint, n_blocks_remote=3, codec="cpu",
                           key="itest-cpu", measure_error=True)
        got = _ksampler(comfy, split, pos, neg)
        records = _controller(split).link.records
    rel = _rel(got, expected)
    bound = max(r.rel_err_bound for r in records)
    record_property("rel_err_cpu", rel)
    record_property("cpu_bound", bound)
    print(f"cpu codec: final relative error {rel:.3e}; per-step carry bounds "
          f"{[round(r.rel_err_bound, 5) for r in records]}, measured {[round(r.rel_err, 5) for r in records]}, "
          f"{records[-1].bytes_out} bytes out vs {records[-1].raw_bytes // 2} as bf16 (carry + result)")
    assert all(0 < r.rel_err <= r.rel_err_bound for r in records)  # each carry within what its message stated
    assert 0 < rel <= bound  # and the sampled latents within the stated per-step error


def test_plan_moved_on_the_daemon_applies_at_the_next_step(comfy, klein, klein_reference, tiny_checkpoint):
    from comfy_mesh.daemon.client import DaemonClient
    from comfy_mesh.splitter.plan import tail_split

    pos, neg, expected = klein_reference
    with running_daemon(tiny_checkpoint, blocks=0, node_id="node-panel") as server:
        split = _split(klein, server, 2, key="itest-panel")
        link = _controller(split).link
        moves = iter([1, 4])  # after step 0 the panel hands a block back, after step 1 takes three

        def panel(step, x0, x, total):
            n_remote = next(moves, None)
            if n_remote is not None:
                with DaemonClient(server.endpoint, timeout_s=30) as other:
                    epoch = other.hello().epoch
                    other.reconfigure(tail_split(5, n_remote, remote="node-panel", epoch=epoch + 1))

        got = _sample_with_callback(comfy, split, pos, neg, panel)
    assert [r.n_blocks_remote for r in link.records] == [2, 1, 4]
    assert _rel(got, expected) <= RAW_TOL


def test_panel_moving_up_from_all_local_applies_at_the_next_step(comfy, klein, klein_reference, tiny_checkpoint):
    """n_blocks_remote 0 sends no FORWARD that could be refused: the node asks the daemon's plan."""
    from comfy_mesh.daemon.client import DaemonClient
    from comfy_mesh.splitter.plan import tail_split

    pos, neg, expected = klein_reference
    with running_daemon(tiny_checkpoint, blocks=0, node_id="node-up") as server:
        split = _split(klein, server, 0, key="itest-up")
        link = _controller(split).link
        moved = []

        def panel(step, x0, x, total):  # after step 0 the panel gives the daemon three blocks
            if not moved:
                with DaemonClient(server.endpoint, timeout_s=30) as other:
                    epoch = other.hello().epoch
                    other.reconfigure(tail_split(5, 3, remote="node-up", epoch=epoch + 1))
                moved.append(step)

        got = _sample_with_callback(comfy, split, pos, neg, panel)
    assert [r.n_blocks_remote for r in link.records] == [3] * (STEPS - 1)  # steps 1 and 2 split
    assert _rel(got, expected) <= RAW_TOL


def test_daemon_with_another_model_is_refused_naming_both_files(comfy, klein, tiny_guided_checkpoint):
    from comfy_mesh.comfyui.errors import MeshError

    with running_daemon(tiny_guided_checkpoint, blocks=0) as server:
        with pytest.raises(MeshError) as info:
            _split(klein, server, 2, key="itest-mismatch")
    text = str(info.value)
    assert "tiny-flux2.safetensors" in text and "tiny-flux2-guided.safetensors" in text
    assert "comfy-mesh daemon --model" in text


FRONTEND_ONLY = {"MarkdownNote", "Note"}  # nodes the frontend draws, that never reach the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


@pytest.mark.parametrize("name", ["flux2-klein-9b-split.json", "flux2-dev-split.json"])
def test_workflow_nodes_and_inputs_exist_in_comfyui(comfy, name):
    """Every node of the example workflow exists in this ComfyUI, with the sockets and widgets used."""
    import asyncio
    import json

    from comfy_mesh.comfyui import NODE_CLASS_MAPPINGS as OURS

    if "Flux2Scheduler" not in comfy.nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(comfy.nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    known = {**comfy.nodes.NODE_CLASS_MAPPINGS, **OURS}
    wf = json.loads((pathlib.Path(__file__).resolve().parent.parent / "workflows" / name).read_text())
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node["type"] in known, f"{name}: ComfyUI has no node {node['type']}"
        spec = known[node["type"]].INPUT_TYPES()
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        for inp in node["inputs"]:
            assert inp["name"] in declared, (node["type"], inp["name"])
            assert str(declared[inp["name"]][0]) == inp["type"], (node["type"], inp["name"])
        linked = {i["name"] for i in node["inputs"]}
        widgets = []
        for input_name, entry in declared.items():
            kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
            if input_name in linked or not (isinstance(kind, list) or str(kind) in WIDGET_TYPES | {"COMBO"}):
                continue
            widgets.append((input_name, kind))
            if options.get("control_after_generate"):
                widgets.append((input_name + " (control)", ["fixed", "increment", "decrement", "randomize"]))
        values = node["widgets_values"]
        required = [w for w in widgets if w[0].split(" ")[0] in spec.get("required", {})]
        assert len(required) <= len(values) <= len(widgets), (node["type"], values, widgets)
        for (input_name, kind), value in zip(widgets, values):
            if isinstance(kind, list) and not input_name.endswith("_name") and input_name != "peer":
                assert value in kind, (node["type"], input_name, value)  # fixed choices (type, sampler, dtype)


@pytest.mark.parametrize("folder", ["custom_node", "."])
def test_comfyui_custom_node_loader_finds_the_node(comfy, folder):
    """ComfyUI's own loader, on the folder a user copies and on the repository cloned into custom_nodes."""
    import asyncio

    path = (pathlib.Path(__file__).resolve().parent.parent / folder).resolve()
    comfy.nodes.NODE_CLASS_MAPPINGS.pop("ComfyMeshSplitFlux2", None)
    assert asyncio.run(comfy.nodes.load_custom_node(str(path))) is True
    from comfy_mesh.comfyui.nodes import SplitFlux2ToPeer

    assert comfy.nodes.NODE_CLASS_MAPPINGS["ComfyMeshSplitFlux2"] is SplitFlux2ToPeer
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["ComfyMeshSplitFlux2"] == "Split FLUX.2 to Peer (comfy-mesh)"


def test_weight_patches_on_local_blocks_apply_and_remote_ones_are_flagged(comfy, klein, tiny_checkpoint):
    """ComfyUI's own modules run the front, so its weight patches (what a LoRA loader adds) count."""
    pos, neg = _conds(96, guidance=False)
    g = torch.Generator().manual_seed(5)
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    delta = 0.05 * torch.randn(klein.get_model_object(key).shape, generator=g)
    patched = klein.clone()
    patched.add_patches({key: (delta,)}, 1.0)  # a "diff" patch on a block that stays local
    plain = _ksampler(comfy, klein, pos, neg)
    expected = _ksampler(comfy, patched, pos, neg)
    assert _rel(expected, plain) > 1e-3  # the patch matters
    with running_daemon(tiny_checkpoint, blocks=0) as server:
        got = _ksampler(comfy, _split(patched, server, 3, key="itest-lora"), pos, neg)
        remote_key = "diffusion_model.single_blocks.2.linear2.weight"
        on_remote = klein.clone()
        on_remote.add_patches({remote_key: (torch.zeros(klein.get_model_object(remote_key).shape),)}, 1.0)
        warned = _controller(_split(on_remote, server, 3, key="itest-lora-remote")).link.warnings
    assert _rel(got, expected) <= RAW_TOL
    assert any("not applied on the peer" in w for w in warned)


def test_reference_latents_edit_split_and_the_unsupported_method_refused(comfy, klein, tiny_checkpoint):
    """FLUX.2 edit: reference images ride as extra image tokens (ComfyUI's default 'index' method)."""
    from comfy_mesh.comfyui.errors import MeshError

    g = torch.Generator().manual_seed(9)
    reference = torch.randn(1, 128, 6, 6, generator=g)
    pos, neg = _conds(96, guidance=False)
    for cond in (pos, neg):
        cond[0][1]["reference_latents"] = [reference]
    expected = _ksampler(comfy, klein, pos, neg)
    with running_daemon(tiny_checkpoint, blocks=0) as server:
        split = _split(klein, server, 3, key="itest-edit")
        got = _ksampler(comfy, split, pos, neg)
        for cond in (pos, neg):
            cond[0][1]["reference_latents_method"] = "index_timestep_zero"
        with pytest.raises(MeshError, match="index_timestep_zero"):
            _ksampler(comfy, split, pos, neg)
    assert _rel(got, expected) <= RAW_TOL
