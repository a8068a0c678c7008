"""Split a ComfyUI FLUX.2 model: ComfyUI runs the front, a comfy-mesh daemon runs the tail.

Everything goes through ComfyUI's model-patching API on a clone of the ModelPatcher;
ComfyUI itself is never edited:

- **The front is ComfyUI's own code.** A DIFFUSION_MODEL wrapper calls ComfyUI's
  `Flux._forward` unchanged: `process_img`, reference latents, `img_in`, `txt_in`,
  `time_in`, the modulations and `double_blocks[i]` / `single_blocks[i]` all run as
  ComfyUI runs them, with whatever LoRA or weight patches ComfyUI applied to them.
- **The hand-off is a block patch.** A `dit` replace patch sits on every block; below
  the split it runs the block (or the patch that was there before), at the first remote
  block it takes the hidden state `[txt; img]` and stops the front by raising
  `_HandOff`, which the wrapper catches. A `post_input` patch records the position ids
  ComfyUI computed (`txt_ids`, `img_ids`). Patches sit on every block so that a plan the
  panel moves mid-run applies at the next step without rebuilding anything.
- **The tail is the daemon's**: blocks `[split, L)` and the final layer, from the same
  checkpoint file (fingerprint-checked), given the hidden state, the timestep (sigma in
  [0, 1], as ComfyUI passes it), guidance (FLUX.2 dev) and the position ids. Its output
  for the image tokens becomes the model output, sliced and un-patchified as ComfyUI does.
- **VRAM.** Object patches swap the remote blocks (and the final layer) in the clone's
  module tree for weightless stand-ins, so ComfyUI's loader, which moves what is in the
  tree, never puts their weights on the GPU: they stay in CPU RAM with the unpatched
  model. The clone reports the front's size to ComfyUI's memory manager and has its own
  `patches_uuid`, so switching between this clone, another split or the unsplit model
  unloads and reloads through ComfyUI's normal path, in both directions, without a
  restart. A block the panel hands back mid-run runs from CPU RAM, moved to the
  compute device for each call, until the node is re-run.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import torch

from .errors import MeshError
from .link import PeerLink, PlanMoved

log = logging.getLogger(__name__)

KEY = "comfy_mesh_split"  # transformer_options key of the per-call capture; wrapper/callback key
MAX_PLAN_RETRIES = 4  # a plan may move again while a step adopts it
SWAPPED = ("diffusion_model.double_blocks", "diffusion_model.single_blocks", "diffusion_model.final_layer")


class _HandOff(BaseException):
    """Carries the hidden state out of ComfyUI's forward at the split.

    A BaseException so that a broad `except Exception` in code between the wrapper and the
    block patch cannot swallow it; only `SplitController.__call__` catches it.
    """

    def __init__(self, hidden: torch.Tensor):
        super().__init__("comfy-mesh hand-off")
        self.hidden = hidden


class _Capture:
    """Per model call: where to stop, and the position ids ComfyUI computed."""

    def __init__(self, split: int):
        self.split = split
        self.txt_ids: torch.Tensor | None = None
        self.img_ids: torch.Tensor | None = None


class _BlockPatch:
    """A `dit` replace patch on one block: run it below the split, hand off at the split."""

    def __init__(self, kind: str, index: int, global_index: int, previous=None):
        self.kind = kind  # "double" or "single"
        self.index = index
        self.global_index = global_index  # execution order: doubles, then singles
        self.previous = previous  # the replace patch that was on this block before ours

    def __call__(self, args: dict, extra: dict) -> dict:
        capture = (args.get("transformer_options") or {}).get(KEY)
        if capture is not None and self.global_index >= capture.split:
            if self.kind == "double":
                raise _HandOff(torch.cat((args["txt"], args["img"]), dim=1))
            raise _HandOff(args["img"])  # single blocks carry [txt; img] already
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)


def _capture_ids(args: dict) -> dict:
    """`post_input` patch: note the ids ComfyUI built (reference latents included)."""
    capture = (args.get("transformer_options") or {}).get(KEY)
    if capture is not None:
        capture.txt_ids, capture.img_ids = args["txt_ids"], args["img_ids"]
    return args


class AwayBlock(torch.nn.Module):
    """Stands in the clone's module tree for a block whose weights stay off the ComfyUI GPU.

    The real module is kept outside the tree (not a registered submodule), so ComfyUI's
    loader never sees its parameters. It only runs if the plan gives the block back
    mid-run; then it is moved to the compute device for the call and back afterwards.
    """

    def __init__(self, name: str, real: torch.nn.Module):
        super().__init__()
        self.block_name = name
        object.__setattr__(self, "_real", real)  # bypasses nn.Module registration on purpose
        self.weight_bytes = sum(p.numel() * p.element_size() for p in real.parameters())
        self._warned = False

    @property
    def real(self) -> torch.nn.Module:
        return self._real

    def forward(self, *args, **kwargs):
        device = next((a.device for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
        real = self._real
        home = next((p.device for p in real.parameters()), device)
        if device is None or device == home:
            return real(*args, **kwargs)
        if not self._warned:
            log.warning("comfy-mesh: %s was handed back mid-run; it runs from CPU RAM until the node runs again",
                        self.block_name)
            self._warned = True
        real.to(device)
        try:
            return real(*args, **kwargs)
        finally:
            real.to(home)

    def extra_repr(self) -> str:
        return f"{self.block_name}: {self.weight_bytes / 1e6:.1f} MB kept off this device"


class SplitController:
    """The DIFFUSION_MODEL wrapper and run callbacks of one split clone."""

    def __init__(self, link: PeerLink, depth_double: int, depth_single: int, guidance_embed: bool):
        self.link = link
        self.depth_double = depth_double
        self.n_blocks = depth_double + depth_single
        self.guidance_embed = guidance_embed
        self.calls = 0  # split model evaluations
        self._warned: set[str] = set()

    # ---------------------------------------------------------------- callbacks

    def on_pre_run(self, patcher) -> None:
        self.link.begin_run()

    def on_cleanup(self, patcher) -> None:
        """After sampling: the model's own module tree again (see `_restore_tree`)."""
        _restore_tree(patcher)
        self.link.end_run()

    # ---------------------------------------------------------------- the wrapper

    def __call__(self, executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                 transformer_options={}, **kwargs):
        model = executor.class_obj
        for _ in range(MAX_PLAN_RETRIES):
            split = self.link.split
            if split >= self.n_blocks:  # all local under the current plan
                if self.link.poll_plan():  # no FORWARD to be refused: ask whether the panel moved it back up
                    continue
                return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
            self._check_supported(model, split, guidance, ref_latents, control, transformer_options, kwargs)
            t0 = time.perf_counter()
            capture = _Capture(split)
            options = dict(transformer_options)
            options[KEY] = capture
            try:
                executor(x, timestep, context, y, guidance, ref_latents, control, options, **kwargs)
            except _HandOff as handoff:
                hidden = handoff.hidden
            else:
                raise MeshError(f"comfy-mesh: ComfyUI's FLUX.2 forward ran to the end without reaching block {split}; "
                                "another node may have replaced the block patches. Put the comfy-mesh node last "
                                "before the sampler.")
            if capture.img_ids is None or capture.txt_ids is None:
                raise MeshError("comfy-mesh: the position ids were not seen (post_input patch did not run); this "
                                "ComfyUI version may not be supported")
            try:
                out = self.link.forward(
                    hidden, timestep=timestep, guidance=guidance if self.guidance_embed else None,
                    txt_ids=capture.txt_ids, img_ids=capture.img_ids)
            except PlanMoved:
                continue
            self.calls += 1
            self.link.record_step_time(time.perf_counter() - t0)
            return _unpatchify(out.to(device=x.device), x, model.patch_size).to(x.dtype)
        raise MeshError("comfy-mesh: the split kept moving during one step; stop moving the slider and queue again")

    def _check_supported(self, model, split, guidance, ref_latents, control, transformer_options, kwargs) -> None:
        if self.guidance_embed and guidance is None:
            raise MeshError("comfy-mesh: this FLUX.2 model embeds a guidance scale but the conditioning has none; "
                            "add a FluxGuidance node to the positive and negative conditioning")
        if ref_latents is not None:
            method = kwargs.get("ref_latents_method", getattr(model.params, "default_ref_method", "index"))
            if method == "index_timestep_zero":
                raise MeshError("comfy-mesh: reference latents with the 'index_timestep_zero' method modulate "
                                "reference tokens apart from the image, which the daemon does not do yet; use the "
                                "'index' method or set n_blocks_remote to 0 for this workflow")
        if kwargs.get("attention_mask") is not None:
            raise MeshError("comfy-mesh: an attention mask is set on the conditioning; the daemon's blocks do not "
                            "take one yet. Remove the mask or set n_blocks_remote to 0.")
        if control is not None:
            late = [i for i, c in enumerate(control.get("input") or []) if c is not None and i >= split]
            late += [self.depth_double + j for j, c in enumerate(control.get("output") or [])
                     if c is not None and self.depth_double + j >= split]
            if late:
                raise MeshError(f"comfy-mesh: a ControlNet adds to blocks {late[0]}+ which run on the peer; lower "
                                f"n_blocks_remote to {self.n_blocks - max(late) - 1} or less so that they run here")
        patches = sorted(k for k in (transformer_options.get("patches") or {}) if k != "post_input")
        if patches:
            note = f"patches {', '.join(patches)} apply to the local blocks only"
            if note not in self._warned:
                self._warned.add(note)
                log.warning("comfy-mesh: %s", note)


def _restore_tree(patcher) -> None:
    """Put the real block lists back on the model once sampling is over.

    ComfyUI leaves a model's object patches applied for as long as it stays loaded. Ours
    swap module subtrees, and code that runs between generations reads the model's tree
    directly (a LoRA loader keeps only the keys `model.state_dict()` has; weight merging and
    saving walk it too), also through other patchers of the same model: they must see the
    real blocks. The next load of this clone applies the stand-ins again (`patch_model`).
    """
    import comfy.utils

    backup = patcher.object_patches_backup  # shared by every clone of this model
    for name in SWAPPED:
        if name in patcher.object_patches and name in backup:
            comfy.utils.set_attr(patcher.model, name, backup.pop(name))


def _unpatchify(out: torch.Tensor, x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, tokens, C*p*p) -> (B, C, H, W) for the first h*w tokens (the image; reference tokens follow)."""
    b, _, h, w = x.shape
    hp, wp = -(-h // patch_size), -(-w // patch_size)
    img = out[:, :hp * wp]
    c = img.shape[-1] // (patch_size * patch_size)
    img = img.reshape(b, hp, wp, c, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
    return img.reshape(b, c, hp * patch_size, wp * patch_size)[:, :, :h, :w]


# ------------------------------------------------------------------ building the clone


def flux2_params(model_patcher):
    """The FLUX.2 diffusion model's params, or a MeshError saying what the model is instead."""
    diffusion_model = model_patcher.get_model_object("diffusion_model")
    params = getattr(diffusion_model, "params", None)
    if not (hasattr(diffusion_model, "double_blocks") and getattr(params, "global_modulation", False)):
        raise MeshError(f"comfy-mesh: this node splits FLUX.2 models (dev, Klein); the model given is "
                        f"{type(model_patcher.model).__name__} / {type(diffusion_model).__name__}. Connect a FLUX.2 "
                        "Load Diffusion Model node to it.")
    return params


def checkpoint_path(model_patcher) -> str | None:
    """The file ComfyUI loaded this model from, as its loaders record it on the patcher."""
    init = getattr(model_patcher, "cached_patcher_init", None)
    if not init or len(init) < 2 or not init[1]:
        return None
    fn, args = init[0], init[1]
    if getattr(fn, "__name__", "") in ("load_diffusion_model", "load_checkpoint_guess_config_model_only",
                                       "load_checkpoint_guess_config"):
        path = args[0]
        return str(path) if isinstance(path, (str, bytes)) or hasattr(path, "__fspath__") else None
    return None


def split_patcher(model_patcher, link: PeerLink, n_blocks_remote: int):
    """A clone of `model_patcher` whose tail runs on `link`'s peer (link connected already)."""
    import comfy.patcher_extension as pe

    if pe.get_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, KEY, model_patcher.model_options,
                                is_model_options=True) or model_patcher.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, KEY):
        raise MeshError("comfy-mesh: this model is split already; use one comfy-mesh node per model")
    params = flux2_params(model_patcher)
    depth_double, depth_single = int(params.depth), int(params.depth_single_blocks)
    n_blocks = depth_double + depth_single
    split = n_blocks - n_blocks_remote
    clone = model_patcher.clone()

    doubles = clone.get_model_object("diffusion_model.double_blocks")
    singles = clone.get_model_object("diffusion_model.single_blocks")
    away: list[AwayBlock] = []
    if n_blocks_remote:
        def swap(blocks, kind, offset):
            items = []
            for i, block in enumerate(blocks):
                if offset + i >= split:
                    stand_in = AwayBlock(f"{kind}_blocks.{i}", block)
                    away.append(stand_in)
                    items.append(stand_in)
                else:
                    items.append(block)
            return torch.nn.ModuleList(items)

        clone.add_object_patch("diffusion_model.double_blocks", swap(doubles, "double", 0))
        clone.add_object_patch("diffusion_model.single_blocks", swap(singles, "single", depth_double))
        final = AwayBlock("final_layer", clone.get_model_object("diffusion_model.final_layer"))
        away.append(final)
        clone.add_object_patch("diffusion_model.final_layer", final)
        # ComfyUI budgets VRAM by the patcher's size: the front only.
        clone.size = max(1, model_patcher.model_size() - sum(a.weight_bytes for a in away))
        remote_prefixes = tuple(f"diffusion_model.{a.block_name}." for a in away)
        patched = sum(1 for k in clone.patches if k.startswith(remote_prefixes))
        if patched:
            note = (f"{patched} weight patches (LoRA) on remote blocks are not applied on the peer; "
                    "lower n_blocks_remote to keep those blocks local")
            link.warnings.append(note)
            log.warning("comfy-mesh: %s", note)
    # Its own weights identity: ComfyUI then fully unloads whatever clone of this model was
    # loaded before (another split or the unsplit model) and loads this one's front.
    clone.patches_uuid = uuid.uuid4()

    replace = clone.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for i in range(depth_double):
        clone.set_model_patch_replace(_BlockPatch("double", i, i, replace.get(("double_block", i))), "dit",
                                      "double_block", i)
    for j in range(depth_single):
        clone.set_model_patch_replace(_BlockPatch("single", j, depth_double + j, replace.get(("single_block", j))),
                                      "dit", "single_block", j)
    clone.set_model_post_input_patch(_capture_ids)

    controller = SplitController(link, depth_double, depth_single, bool(params.guidance_embed))
    clone.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, KEY, controller)
    clone.add_callback_with_key(pe.CallbacksMP.ON_PRE_RUN, KEY, controller.on_pre_run)
    clone.add_callback_with_key(pe.CallbacksMP.ON_CLEANUP, KEY, controller.on_cleanup)
    clone.set_attachments(KEY, controller)
    return clone


def controller_of(model_patcher) -> SplitController | None:
    """The split controller of a clone made by `split_patcher` (tests, status)."""
    return model_patcher.get_attachment(KEY) if hasattr(model_patcher, "get_attachment") else None


# ------------------------------------------------------------------ the node's entry point

_LINKS: dict[str, PeerLink] = {}  # node key -> its live link; a re-run node replaces its link
_LINKS_LOCK = threading.Lock()


def make_split(model_patcher, *, peer: str, address: str, n_blocks_remote: int, codec: str = "auto",
               quality: float = 7.0, key: str = "comfy-mesh", measure_error: bool = False,
               connect_timeout_s: float | None = None):
    """What the node does: resolve the peer, check the model, connect, install the plan, clone.

    Returns the split ModelPatcher. Raises MeshError with what to do.
    """
    from .link import LinkSettings, identity_of
    from .peers import check_codec, resolve_peer

    params = flux2_params(model_patcher)
    display, _, endpoint = resolve_peer(peer, address)
    load_device = getattr(model_patcher, "load_device", None)
    check_codec(codec)  # "auto" is settled with the peer's codecs after HELLO (link.connect)
    path = checkpoint_path(model_patcher)
    identity = identity_of(params, path)
    settings = LinkSettings(key=key, peer=display, endpoint=endpoint, n_blocks_remote=int(n_blocks_remote),
                            codec=codec, quality=float(quality), measure_error=measure_error,
                            local_cuda=getattr(load_device, "type", "cpu") == "cuda")
    if connect_timeout_s is not None:
        settings.connect_timeout_s = connect_timeout_s
    with _LINKS_LOCK:
        old = _LINKS.pop(key, None)
    if old is not None:
        old.close()
    link = PeerLink(settings, identity)
    link.connect()
    try:
        clone = split_patcher(model_patcher, link, int(n_blocks_remote))
    except BaseException:
        link.close()
        raise
    with _LINKS_LOCK:
        _LINKS[key] = link
    return clone


def close_all() -> None:
    """Close every link (tests; ComfyUI exits without it)."""
    with _LINKS_LOCK:
        links = list(_LINKS.values())
        _LINKS.clear()
    for link in links:
        link.close()
