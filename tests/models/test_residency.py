"""Memory modes (models/residency.py, models/memory_plan.py): streamed branches compute exactly what resident ones do.

On the CPU the streaming path copies between CPU tensors with the same hooks as on CUDA, so these tests exercise the
real machinery: outputs against the resident model (exact), no copies left after a forward, the prefetch window,
the hook order, release, the "auto" choice, and the peak estimate against a CPU allocation trace. The CUDA variants
run only where a GPU is present.
"""

import dataclasses

import pytest
import torch
from ideogram4_gguf.errors import SamplingError
from ideogram4_gguf.models import memory_plan, residency
from ideogram4_gguf.models.dit import Ideogram4Config, Ideogram4DiT
from ideogram4_gguf.models.dit_loader import load_dit_branches
from ideogram4_gguf.models.memory_plan import (
    MEMORY_MODES,
    estimate_peak_bytes,
    module_stored_bytes,
    resolve_memory_mode,
)
from ideogram4_gguf.models.residency import place_branches
from ideogram4_gguf.ops import Fp8Linear, QuantLinear, StateDictSource
from ideogram4_gguf.sampler.flow import sample
from ideogram4_gguf.sampler.presets import sampler_settings

import synthetic  # bench/synthetic.py (bench/ is on the test path: pyproject.toml)

TINY = synthetic.PRESETS["tiny"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.fixture(autouse=True)
def one_thread():
    # The shared 2-core CI machine: a second intra-op thread only adds contention for models this small.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def q4_k_file(tmp_path_factory):
    return synthetic.q4_k_gguf(TINY, tmp_path_factory.mktemp("residency"), seed=3, preset="tiny", log=lambda _: None)


def _random_state(config, with_text, gen):
    with torch.device("meta"):
        names = [(n, tuple(p.shape)) for n, p in Ideogram4DiT(config, with_text).named_parameters()]
    state = {}
    for name, shape in names:
        base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
        state[name] = base + 0.05 * torch.randn(shape, generator=gen)
    return state


def _fp8(state):
    out = {}
    for name, tensor in state.items():
        if tensor.dim() == 2 and name != "embed_image_indicator.weight":
            scale = tensor.abs().amax(dim=1).clamp(min=1e-12) / 448.0
            out[name], out[name + "_scale"] = (tensor / scale[:, None]).to(torch.float8_e4m3fn), scale
        else:
            out[name] = tensor
    return out


def _branches(kind, q4_k_file, seed=0):
    """(cond, uncond) of the tiny config with Q4_K (QuantLinear), fp8 (Fp8Linear) or dense float32 Linears."""
    if kind == "q4_k":
        cond, uncond, _ = load_dit_branches(q4_k_file["path"], compute_dtype=torch.float32)
        return cond, uncond
    gen = torch.Generator().manual_seed(seed)
    built = []
    for with_text in (True, False):
        state = _random_state(TINY, with_text, gen)
        state = _fp8(state) if kind == "fp8" else state
        built.append(Ideogram4DiT.from_weights(TINY, StateDictSource(state), with_text=with_text))
    return tuple(built)


def _inputs(config, seed, grid=(4, 6), text=9):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, grid[0] * grid[1], config.in_channels, generator=gen)
    features = torch.randn(text, config.llm_features_dim, generator=gen) * 2
    return latents, features, torch.tensor([0.37]), grid


def _velocities(cond, uncond, inputs, device):
    latents, features, t, grid = inputs
    projected = cond.project_text(features.to(device))
    return cond(latents, t, projected, grid).cpu(), uncond(latents, t, None, grid).cpu()


def _all_tensors(branch):
    return {name: t for name, t in [*branch.named_parameters(), *branch.named_buffers()]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["q4_k", "fp8", "dense"])
@pytest.mark.parametrize("mode", ["stream_uncond", "cpu_offload"])
def test_streamed_forward_equals_resident_forward(q4_k_file, kind, mode, device):
    cond, uncond = _branches(kind, q4_k_file)
    expected_kind = {"q4_k": QuantLinear, "fp8": Fp8Linear, "dense": torch.nn.Linear}[kind]
    assert type(uncond.layers[0].attention.qkv) is expected_kind
    inputs = _inputs(TINY, seed=1)
    resident = place_branches(cond, uncond, device, "gpu")
    expected = _velocities(cond, uncond, inputs, device)
    resident.release()
    placement = place_branches(cond, uncond, device, mode)
    got = _velocities(cond, uncond, inputs, device)
    assert expected[0].abs().max() > 0.05 and expected[1].abs().max() > 0.05  # a real signal
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    placement.release()


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_streamed_units_hold_no_copies_after_forward(q4_k_file, prefetch):
    cond, uncond = _branches("q4_k", q4_k_file)
    placement = place_branches(cond, uncond, "cpu", "cpu_offload", prefetch=prefetch)
    host_packed = uncond.layers[1].feed_forward.w2.packed
    seen = []
    # registered after the placement's hook, so it sees what the block computes with: a copy, not the host tensor
    handle = uncond.layers[1].register_forward_pre_hook(
        lambda module, args: seen.append(module.feed_forward.w2.packed))
    _velocities(cond, uncond, _inputs(TINY, seed=2), "cpu")
    handle.remove()
    assert len(seen) == 1 and seen[0].data_ptr() != host_packed.data_ptr() and torch.equal(seen[0], host_packed)
    for role in ("cond", "uncond"):
        streamer = placement.placements[role].streamer
        assert streamer.live == {}
        for unit in streamer.units.values():
            assert unit.copies is None
            # every slot holds its host tensor again, not a copy
            assert all(slot.get() is host or slot.get().data_ptr() == host.data_ptr()
                       for slot, host in zip(unit.slots, unit.hosts))
        stats = streamer.stats
        assert stats.max_live_units == prefetch + 1
        # each unit copied exactly once per use: the whole branch once per forward (+ the text modules for cond)
        assert stats.bytes_copied == streamer.host_bytes
        assert stats.fetches == len(streamer.units)
    placement.release()


def test_hooks_fire_in_the_declared_prefetch_order(q4_k_file):
    cond, uncond = _branches("q4_k", q4_k_file)
    placement = place_branches(cond, uncond, "cpu", "cpu_offload")
    _velocities(cond, uncond, _inputs(TINY, seed=3), "cpu")
    blocks = [f"layers.{i}" for i in range(TINY.num_layers)]
    forward = ["input_proj", "t_embedding", "adaln_proj", *blocks, "final_layer"]
    assert placement.cond.stats.calls == ["llm_cond_norm", "llm_cond_proj", *forward]
    assert placement.uncond.stats.calls == forward
    placement.release()


def test_release_restores_every_original_tensor_and_removes_hooks(q4_k_file):
    cond, uncond = _branches("q4_k", q4_k_file)
    before = {role: _all_tensors(b) for role, b in (("cond", cond), ("uncond", uncond))}
    placement = place_branches(cond, uncond, "cpu", "stream_uncond")
    with pytest.raises(RuntimeError, match="already placed"):
        place_branches(cond, uncond, "cpu", "gpu")
    placement.release()
    for role, branch in (("cond", cond), ("uncond", uncond)):
        after = _all_tensors(branch)
        assert after.keys() == before[role].keys()
        assert all(after[name] is before[role][name] for name in after)
        assert not branch._forward_pre_hooks and all(not m._forward_pre_hooks for m in branch.modules())
    fetches = placement.uncond.stats.fetches
    _velocities(cond, uncond, _inputs(TINY, seed=4), "cpu")
    assert placement.uncond.stats.fetches == fetches  # nothing streams after release
    place_branches(cond, uncond, "cpu", "gpu").release()  # placeable again


@pytest.mark.parametrize("fail_at", ["second streamer", "half-built streamer", "tensor swap"])
def test_a_placement_that_fails_half_way_is_rolled_back(q4_k_file, monkeypatch, fail_at):
    # e.g. out of device memory while copying the second branch: nothing may stay moved or hooked, and the
    # branches must be placeable again (a ComfyUI retry with another memory mode)
    cond, uncond = _branches("q4_k", q4_k_file)
    before = {role: _all_tensors(b) for role, b in (("cond", cond), ("uncond", uncond))}
    expected = _velocities(cond, uncond, _inputs(TINY, seed=5), "cpu")
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if fail_at == "second streamer":  # cpu_offload: the conditional streamer is built, the unconditional one fails
        built = []
        real = residency._BranchStreamer

        def streamer(*args, **kwargs):
            if built:
                raise out_of_memory("simulated")
            built.append(real(*args, **kwargs))
            return built[-1]

        monkeypatch.setattr(residency, "_BranchStreamer", streamer)
        mode = "cpu_offload"
    elif fail_at == "half-built streamer":  # the unconditional streamer fails after hooking some of its units
        real_hold = residency._Unit.__init__
        count = []

        def unit_init(self, name, module):
            count.append(name)
            if len(count) == 3:
                raise out_of_memory("simulated")
            real_hold(self, name, module)

        monkeypatch.setattr(residency._Unit, "__init__", unit_init)
        mode = "stream_uncond"
    else:  # the 40th stored tensor swapped into place fails (on the CPU: inside the second branch's streamer)
        moved = []
        real_set = residency._Slot.set

        def slot_set(self, tensor):
            moved.append(self.name)
            if len(moved) == 40:
                raise out_of_memory("simulated")
            real_set(self, tensor)

        monkeypatch.setattr(residency._Slot, "set", slot_set)
        mode = "cpu_offload"
    with pytest.raises(out_of_memory, match="simulated"):
        place_branches(cond, uncond, "cpu", mode)
    monkeypatch.undo()
    for role, branch in (("cond", cond), ("uncond", uncond)):
        after = _all_tensors(branch)
        assert all(after[name] is before[role][name] for name in after), role
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in branch.modules())
        assert branch._ideogram4_placement is None
    placement = place_branches(cond, uncond, "cpu", "stream_uncond")  # placeable again, same results
    got = _velocities(cond, uncond, _inputs(TINY, seed=5), "cpu")
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    placement.release()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inference_mode", [False, True])  # ComfyUI samples under torch.inference_mode()
def test_sampler_gives_identical_latents_in_every_mode(q4_k_file, device, inference_mode):
    cond, uncond = _branches("q4_k", q4_k_file)
    settings = sampler_settings("default", steps=3, polish_steps=1)
    features = _inputs(TINY, seed=5)[1]
    results = {}
    for mode in MEMORY_MODES:
        with torch.inference_mode(inference_mode):
            placement = place_branches(cond, uncond, device, mode)
            projected = cond.project_text(features.to(device))
            results[mode] = sample(cond, uncond, projected, 256, 272, seed=11, settings=settings).cpu()
            placement.release()
    assert results["gpu"].abs().max() > 0.5
    for mode, latents in results.items():
        torch.testing.assert_close(latents, results["gpu"], rtol=0, atol=0, msg=mode)


def test_summary_names_the_mode_and_branches(q4_k_file):
    cond, uncond = _branches("q4_k", q4_k_file)
    placement = place_branches(cond, uncond, "cpu", "stream_uncond", prefetch=2)
    text = placement.summary()
    assert "stream_uncond" in text and "cond resident" in text and "uncond streamed" in text and "2 unit" in text
    assert placement.uncond.stored_bytes == module_stored_bytes(uncond) > 0
    # only embed_image_indicator stays put in a streamed branch: 2 rows x hidden, float32
    assert placement.uncond.device_bytes == 2 * TINY.hidden_size * 4
    placement.release()


def test_resolve_memory_mode(tmp_path):
    # six blocks, so that a few streamed blocks are less than a branch
    config = dataclasses.replace(TINY, num_layers=6)
    path = synthetic.q4_k_gguf(config, tmp_path, preset="tiny6", log=lambda _: None)["path"]
    cond, uncond, _ = load_dit_branches(path, compute_dtype=torch.float32)
    assert resolve_memory_mode("auto", cond, uncond, "cpu") == "gpu"  # the CPU keeps everything resident
    assert resolve_memory_mode("cpu_offload", cond, uncond, "cpu") == "cpu_offload"
    with pytest.raises(SamplingError, match="not one of"):
        resolve_memory_mode("low_vram", cond, uncond, "cpu")
    # On CUDA "auto" compares the computed peaks with the free memory (free_bytes given: no GPU needed to decide).
    sizes = {"width": 512, "height": 512, "text_tokens": 32}
    peaks = {m: estimate_peak_bytes(m, config, module_stored_bytes(cond), module_stored_bytes(uncond),
                                    compute_dtype=torch.float32,
                                    **sizes).total for m in ("gpu", "stream_uncond", "cpu_offload")}
    assert peaks["gpu"] > peaks["stream_uncond"] > peaks["cpu_offload"]
    for free, expected in ((peaks["gpu"] / 0.9 + 1, "gpu"), (peaks["gpu"] / 0.9 - 1, "stream_uncond"),
                           (peaks["stream_uncond"] / 0.9 - 1, "cpu_offload")):
        assert resolve_memory_mode("auto", cond, uncond, "cuda", free_bytes=int(free), **sizes) == expected


def test_full_size_plans_match_the_spec_memory_plans():
    # docs/spec.md §G8.1-§G8.3: both Q4_K branches 10.44 GB; the streamed-uncond plan ≈ 6.3 GiB resident peak;
    # both resident ≈ 10.8-11.0 GiB (bf16, 1024², batch 1). Stored bytes as the loader holds them (uncond without
    # llm_cond_*): the q4_k recipe's sizes.
    from bench_pipeline import full_size_stored_bytes

    cond_bytes, uncond_bytes = full_size_stored_bytes()
    assert abs(cond_bytes - 5.22e9) < 0.01e9 and abs(uncond_bytes + 138.2e6 - 5.22e9) < 0.01e9
    config = Ideogram4Config()
    gib = 2**30
    both = estimate_peak_bytes("gpu", config, cond_bytes, uncond_bytes).phases["denoise"]
    streamed = estimate_peak_bytes("stream_uncond", config, cond_bytes, uncond_bytes).phases["denoise"]
    assert 10.0 * gib < both < 11.0 * gib
    assert 5.5 * gib < streamed < 6.5 * gib
    assert estimate_peak_bytes("gpu", config, cond_bytes, uncond_bytes).total < 12e9
    assert estimate_peak_bytes("stream_uncond", config, cond_bytes, uncond_bytes).total < 8e9


@pytest.mark.parametrize("kind", ["q4_k", "dense"])
def test_block_estimate_matches_cpu_allocation_trace(tmp_path, kind):
    # Real head size (256) and MLP ratio, small width: the estimate's unit model against the allocator's events.
    from instrument import cpu_transient_peak

    config = Ideogram4Config(hidden_size=512, num_layers=1, num_heads=2, head_dim=256, intermediate_size=1280,
                             adaln_dim=256, llm_features_dim=512)
    if kind == "q4_k":
        path = synthetic.q4_k_gguf(config, tmp_path, preset="trace", log=lambda _: None)["path"]
        cond, _, _ = load_dit_branches(path, compute_dtype=torch.float32)
    else:
        gen = torch.Generator().manual_seed(7)
        cond = Ideogram4DiT.from_weights(config, StateDictSource(_random_state(config, True, gen)))
    for grid, text in (((24, 24), 48), ((32, 40), 100)):
        latents, features, t, _ = _inputs(config, seed=8, grid=grid, text=text)
        projected = cond.project_text(features)
        rotary = cond.rotary(text, grid)
        _, measured = cpu_transient_peak(lambda args=(latents, t, projected, grid, rotary): cond(*args))
        if measured is None:
            pytest.skip("this torch build's profiler exposes no allocation events")
        rows = text + grid[0] * grid[1]
        estimated = memory_plan._block_peak_bytes(config, rows, 4, 4, dense_weights=kind == "q4_k")
        assert 0.85 * measured <= estimated <= 1.15 * measured, (rows, measured, estimated)


def test_estimate_window_grows_with_prefetch_and_is_capped_by_the_branch():
    config = Ideogram4Config()
    one = estimate_peak_bytes("stream_uncond", config, 5 * 10**9, 5 * 10**9, prefetch=1).stream_window
    three = estimate_peak_bytes("stream_uncond", config, 5 * 10**9, 5 * 10**9, prefetch=3).stream_window
    assert abs(three / one - 5 / 3) < 1e-6  # prefetch + 2 blocks alive
    assert estimate_peak_bytes("gpu", config, 5 * 10**9, 5 * 10**9).stream_window == 0
    shallow = dataclasses.replace(config, num_layers=2)
    assert estimate_peak_bytes("stream_uncond", shallow, 10**9, 10**9, prefetch=3).stream_window == 10**9
    with pytest.raises(ValueError, match="explicit mode"):
        estimate_peak_bytes("auto", config, 10**9, 10**9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_streaming_frees_device_copies(q4_k_file):
    cond, uncond = _branches("q4_k", q4_k_file)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    placement = place_branches(cond, uncond, "cuda", "stream_uncond")
    assert all(h.is_pinned() for unit in placement.uncond.streamer.units.values() for h in unit.hosts)
    placed = torch.cuda.memory_allocated()
    assert placed - base < module_stored_bytes(cond) + module_stored_bytes(uncond) // 2
    _velocities(cond, uncond, _inputs(TINY, seed=9), "cuda")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - placed < 1 << 20  # the uncond copies are gone
    placement.release()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= base + (1 << 20)
