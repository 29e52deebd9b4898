"""Mutation check: break the code on purpose, one targeted way at a time, and see the tests that guard it fail.

Each mutation replaces one exact piece of source text (it must occur exactly once: a mutation that no longer applies
is an error, so that the list stays true to the code) in a copy of the repository, then runs the tests named for
it there. A mutation is *killed* when those tests fail, and *survives* when they pass: a survivor is a gap in the
suite. The working tree is never modified.

    .venv/bin/python tools/mutation_check.py            # every mutation, two at a time
    .venv/bin/python tools/mutation_check.py halo-1     # some, by name
    .venv/bin/python tools/mutation_check.py --list

CI runs it after the test suite (`make mutation-check`, with `--no-baseline`: the suite has just passed), so that a
test that stops biting fails the build. Exit status 1 if a mutation survives. Each issue that builds a part adds
mutations for it: one-line bugs a developer could plausibly write, each with the tests that must catch it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "eager-gemm-library-fixed", "an eager program multiplies gathered rows by BLAS whatever library its plan names",
        "fisedit_compiler/runtime/ops.py",
        "    return fisedit.matmul_rows.default(rows, kernel, bias, gemm)",
        "    return fisedit.matmul_rows.default(rows, kernel, bias, \"blas\")",
        ("tests/test_programs.py::test_an_eager_program_takes_each_plans_gemm_library_at_its_call",),
    ),
    Mutation(
        "sparse-control-wrong-rows", "a controlled sparse call takes the source map's rows in reverse pixel order",
        "fisedit_compiler/runtime/ops.py",
        "b.source(ref).index_select(-2, positions)",
        "b.source(ref).index_select(-2, positions.flip(0))",
        ("tests/test_contract.py::test_a_controlled_sparse_call_on_the_recorded_input_returns_the_recorded_output",),
    ),
    Mutation(
        "sparse-control-off", "sparse calls under control run the stock cross-attention",
        "fisedit_compiler/runtime/ops.py",
        "    positions = b.index(ActivePixels(layout.res), False).field(\"recorded_index\")\n    return _controlled",
        "    return aten.scaled_dot_product_attention.default(query, key, value, scale=scale)\n    return _controlled",
        ("tests/test_contract.py::test_a_controlled_sparse_call_over_everything_equals_the_dense_control_call",),
    ),
    Mutation(
        "eager-border-ignored", "an eager program never zeroes the windows' pixels outside the map",
        "fisedit_compiler/kernels/reference.py",
        "    return windows if inside is None else windows * inside.type_as(windows)",
        "    return windows",
        ("tests/test_programs.py::test_an_eager_program_serves_masks_of_every_size_and_place",),
    ),
    Mutation(
        "repeat-another-block", "the blocks that round a block count up repeat a neighbour instead of the last block",
        "fisedit_compiler/runtime/mask_plan.py",
        "blocks = torch.cat([blocks, blocks[-1:].expand(", "blocks = torch.cat([blocks, (blocks[-1:] + 1).expand(",
        ("tests/test_programs.py::test_masks_of_about_the_same_size_share_a_program_through_repeated_blocks",),
    ),
    Mutation(
        "halo-into-reference", "the halo grows past the picture's edge into FLUX Kontext's reference tokens",
        "fisedit_compiler/runtime/mask_plan.py",
        "        if self.latent_res != self.mask_res:  # the halo stops", "        if False:  # the halo stops",
        ("tests/test_transformers.py::test_flux_kontext_reference_tokens_are_stacked_below_the_picture_and_never_recomputed",),
    ),
    Mutation(
        "reference-rows-dropped", "the layout of FLUX Kontext's tokens forgets the reference's rows",
        "fisedit_compiler/adapters/flux_transformer.py",
        "        return (rows + ref_rows) * PACKING, cols * PACKING\n", "        return rows * PACKING, cols * PACKING\n",
        ("tests/test_transformers.py::test_flux_kontext_reference_tokens_are_stacked_below_the_picture_and_never_recomputed",
         "tests/test_transformers.py::test_an_edit_session_over_flux_kontext_edits_its_picture_inside_the_mask_only"),
    ),
    Mutation(
        "painted-mask-ignored", "the page drops the mask a user painted and detects one instead",
        "fisedit_compiler/app/controller.py",
        "    return Image.fromarray(alpha.astype(np.uint8) * 255, \"L\")\n", "    return None\n",
        ("tests/test_app.py::test_generate_edit_undo_download_and_reopen",
         "tests/test_app.py::test_an_empty_painting_means_a_detected_mask"),
    ),
    Mutation(
        "compute-thread-bypassed", "a service given a compute thread computes on the caller's thread",
        "fisedit_compiler/service/sessions.py",
        "        if self.compute is None:\n            return method(self, *args, **kwargs)\n",
        "        if True:\n            return method(self, *args, **kwargs)\n",
        ("tests/test_service.py::test_a_service_with_a_compute_thread_computes_only_there",),
    ),
    Mutation(
        "plan-kept-through-decode", "an edit keeps its plan's flattened kernels and indices through the decode",
        "fisedit_compiler/editing/session.py",
        "            self._run.release_memory()  # the denoising is over", "            pass  # the denoising is over",
        ("tests/test_memory_bound.py::test_an_edit_drops_what_its_plan_made_for_the_programs_before_the_decode",),
    ),
    Mutation(
        "bound-without-headroom", "the stated memory bound leaves nothing to the system",
        "fisedit_compiler/runtime/tiered_store.py",
        "    calls = max(0, available - budget - headroom)\n", "    calls = max(0, available - budget)\n",
        ("tests/test_memory_bound.py::test_a_session_states_its_memory_bound_from_the_memory_available",),
    ),
    Mutation(
        "call-room-unchecked", "a session whose flattened kernels exceed the bound's room for a call is not refused",
        "fisedit_compiler/runtime/tiered_store.py",
        "        if nbytes > self.calls:\n", "        if nbytes > self.calls + self.available:\n",
        ("tests/test_memory_bound.py::test_a_session_whose_calls_cannot_fit_its_bound_is_refused_before_any_run",),
    ),
    Mutation(
        "oversized-decoder-record-fatal",
        "a decoder record larger than the budget fails the run instead of decoding eagerly",
        "fisedit_compiler/editing/decoding.py",
        "            except CacheBudgetError as error:", "            except ZeroDivisionError as error:",
        ("tests/test_memory_bound.py::"
         "test_a_decoder_record_larger_than_the_budget_falls_back_to_eager_decodes_with_a_warning",),
    ),
    Mutation(
        "old-decoder-record-kept", "a recording decode keeps the old record beside the one it is making",
        "fisedit_compiler/editing/decoding.py",
        "            self.cache.clear()  # go first", "            pass  # go first",
        ("tests/test_sparse_decode.py::test_a_recording_decode_lets_the_old_record_go_before_it_records",),
    ),
    Mutation(
        "record-compacted-at-once", "a record is copied into one allocation before any original goes (twice at once)",
        "fisedit_compiler/runtime/cache.py",
        "            if size >= SLAB_PIECE:\n", "            if False:\n",
        ("tests/test_tiered_cache.py::test_a_large_record_is_compacted_piece_by_piece",),
    ),
    Mutation(
        "cli-guidance-5", "the CLI runs the shapes model at guidance 5, where a colour swap erased its object",
        "fisedit_compiler/cli.py",
        "    guidance = guidance_scale or args.guidance_scale or GUIDANCE_SCALE\n",
        "    guidance = guidance_scale or args.guidance_scale or 5.0\n",
        ("tests/test_cli.py::test_the_first_colour_swap_a_newcomer_types_keeps_a_recoloured_object_in_place",),
    ),
    Mutation(
        "journal-mask-dropped", "a journaled edit's user mask is not replayed (the edit reopens as a detected one)",
        "fisedit_compiler/service/sessions.py",
        '                session.edit(edit["prompt"], mask=mask)\n', '                session.edit(edit["prompt"])\n',
        ("tests/test_service.py::test_edits_are_journaled_and_another_process_replays_them",),
    ),
    Mutation(
        "eager-programs-dispatched", "eager programs call the registered operators, not the functions behind them",
        "fisedit_compiler/runtime/executor.py",
        "            return program.direct()\n", "            return program.gm\n",
        ("tests/test_programs.py::test_eager_calls_run_the_kernels_directly_with_the_operators_values",),
    ),
    Mutation(
        "app-errors-unexplained", "the page passes the service's refusals on as raw exceptions (a stack trace)",
        "fisedit_compiler/app/controller.py",
        "            raise AppError(str(error)) from error\n", "            pass\n",
        ("tests/test_app.py::test_bad_input_gets_a_message_and_loses_nothing",),
    ),
    Mutation(
        "pixel-map-not-batched", "a T2I-Adapter residual of batch 1 is gathered as is beside latents of batch 2",
        "fisedit_compiler/adapters/base.py",
        "    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[0] == 1 and batch > 1:\n",
        "    if False:\n",
        ("tests/test_conditioning.py::test_t2i_adapter_residuals_are_pixel_inputs_of_sparse_calls",),
    ),
    Mutation(
        "settings-not-keyed", "graphs are keyed by input signature only: a LoRA weight changed after a record runs the "
        "graph captured with the old one",
        "fisedit_compiler/runtime/executor.py",
        "        signature = graph, InputSignature.of(inputs), settings\n",
        "        signature = graph, InputSignature.of(inputs)\n",
        ("tests/test_conditioning.py::test_a_record_is_replayed_only_under_its_lora_settings",),
    ),
    Mutation(
        "settings-not-checked", "a sparse call replays a record made under other LoRA settings",
        "fisedit_compiler/runtime/executor.py",
        "        if not isinstance(mode, RecordMode):\n            run.cache.check_settings(settings)\n", "",
        ("tests/test_conditioning.py::test_a_record_is_replayed_only_under_its_lora_settings",
         "tests/test_conditioning.py::test_an_edit_session_over_a_lora_pipeline"),
    ),
    Mutation(
        "ip-tokens-controlled", "Prompt-to-Prompt control treats an IP-Adapter's image-token attention as the prompt's",
        "fisedit_compiler/passes/control_cross_attention.py",
        "                or (marked and not reads_input(node.args[1], lambda i: i.text)):\n",
        "                or False:\n",
        ("tests/test_conditioning.py::test_an_edit_session_over_an_ip_adapter_pipeline",),
    ),
    Mutation(
        "legacy-pipeline-not-interrupted", "a legacy pipeline (T2I-Adapter) runs every step after an empty detected "
        "mask",
        "fisedit_compiler/editing/pipelines.py",
        "            raise Interrupted\n", "            pass\n",
        ("tests/test_conditioning.py::test_an_edit_session_over_a_t2i_adapter_pipeline",),
    ),
    Mutation(
        "companion-not-switched", "an edit switches the U-Net's mode but leaves the ControlNet's as it was",
        "fisedit_compiler/editing/companions.py",
        "        for run, follower in zip(self.runs, self.followers(mode)):\n            run.switch(follower)\n", "",
        ("tests/test_adapters.py::test_an_edit_session_runs_a_controlnet_sparse_beside_the_unet",),
    ),
    Mutation(
        "joint-text-recorded", "a joint sequence's scatter takes its text tokens from the record, not the call",
        "fisedit_compiler/runtime/ops.py",
        "    recorded = pixels if ref is None else joint_pixels(b.recorded(ref), layout)\n",
        "    recorded = pixels if ref is None else joint_pixels(b.recorded(ref), layout)\n"
        "    if ref is not None:\n        before, _, after = joint_parts(b.recorded(ref), layout)\n",
        ("tests/test_transformers.py::test_full_mask_equals_the_dense_call_on_new_inputs",),
    ),
    Mutation(
        "patches-not-recomputed-pixels", "a transformer's recomputed latent pixels are its active tokens' cells, "
        "not their patches",
        "fisedit_compiler/runtime/mask_plan.py",
        "        f = self.output_downscale\n", "        f = 1\n",
        ("tests/test_transformers.py::test_outside_the_recomputed_tokens_the_output_is_recorded_exactly",),
    ),
    Mutation(
        "write-back-off", "sparse calls never write their fresh blocks back into the cache",
        "fisedit_compiler/runtime/ops.py",
        "    if not b.write_back:\n        return\n", "    return\n",
        ("tests/test_editing.py::test_a_continuous_edit_builds_on_the_activations_the_previous_edit_wrote_back",
         "tests/test_editing.py::test_session_end_to_end"),
    ),
    Mutation(
        "control-off", "cross-attention control keeps the fresh maps instead of injecting the source's",
        "fisedit_compiler/runtime/ops.py",
        "    return torch.where(alignment >= 0, aligned, probs)\n", "    return probs\n",
        ("tests/test_editing.py::test_control_injects_the_source_maps_of_shared_tokens",),
    ),
    Mutation(
        "halo-1", "the halo is one unit (latent pixel or cell) smaller",
        "fisedit_compiler/runtime/mask_plan.py",
        "        h = self.policy.halo\n", "        h = self.policy.halo - 1\n",
        ("tests/test_contract.py::test_sparse_call_equals_the_masked_dense_reference",
         "tests/test_contract.py::test_outside_active_blocks_the_output_is_recorded_exactly"),
    ),
    Mutation(
        "fresh-norm-stats", "GroupNorm computes fresh statistics where the policy says recorded",
        "fisedit_compiler/passes/find_sparse_regions.py",
        'return None if policy.norm_stats == "recorded" else "dense"', 'return "dense"',
        ("tests/test_contract.py::test_sparse_call_equals_the_masked_dense_reference",),
    ),
    Mutation(
        "scatter-shifted", "gathered pixels map to the pixels one row below theirs (scatters write wrong blocks)",
        "fisedit_compiler/runtime/mask_plan.py",
        "        pixel_to_gathered[windows.rows * res[1] + windows.cols] = torch.arange(",
        "        pixel_to_gathered[(windows.rows * res[1] + windows.cols + res[1]) % (res[0] * res[1])] = torch.arange(",
        ("tests/test_contract.py::test_sparse_call_equals_the_masked_dense_reference",
         "tests/test_contract.py::test_outside_active_blocks_the_output_is_recorded_exactly"),
    ),
    Mutation(
        "step-key-occurrence", "replays ignore which call at a timestep they are (PNDM's and Heun's second calls)",
        "fisedit_compiler/runtime/run.py",
        "            occurrence %= max(1, self.cache.occurrences(key))\n", "            occurrence = 0\n",
        ("tests/test_pipeline.py::test_replays_of_schedulers_that_call_twice_at_one_timestep",),
    ),
    Mutation(
        "step-off-by-one", "sparse calls read the record of the step before theirs",
        "fisedit_compiler/runtime/executor.py",
        "        step = cache.step(key)\n        if step.maps_only:",
        "        step = cache.step(cache.steps[max(0, cache.steps.index(key) - 1)])\n"
        "        if step.maps_only:",
        ("tests/test_pipeline.py::test_stable_diffusion_pipeline_records_and_replays_sparsely",),
    ),
    Mutation(
        "everything-active", "every pixel counts as active (no sparsity, and a region check must notice)",
        "fisedit_compiler/runtime/mask_plan.py",
        "self._active_maps[res] = self._build_active_map(res)",
        "self._active_maps[res] = torch.ones(res, dtype=torch.bool, device=self.device)",
        ("tests/test_contract.py::test_outside_active_blocks_the_output_is_recorded_exactly",
         "tests/test_pipeline.py::test_stable_diffusion_pipeline_records_and_replays_sparsely"),
    ),
    Mutation(
        "full-region-edit-drops-maps", "an edit whose region is everything records without cross-attention maps",
        "fisedit_compiler/editing/session.py",
        "RecordMode(attention_maps=schedule.remaining_maps_steps(),",
        "RecordMode(attention_maps=0,",
        ("tests/test_editing.py::test_an_edit_after_a_full_region_edit_detects_its_mask_with_that_edit_s_maps",),
    ),
    # round 2 (issue 38): the parts built since the first ten
    Mutation(
        "prefetch-current-step", "a replay asks the store to read ahead the step being read, not the next one",
        "fisedit_compiler/runtime/cache.py",
        "            self.store.prefetch(steps[following])", "            self.store.prefetch(steps[following - 1])",
        ("tests/test_tiered_cache.py::"
         "test_a_replay_through_the_record_cache_reads_each_spilled_step_ahead_in_the_background",),
    ),
    Mutation(
        "saved-occurrence-lost", "a saved session's step keys lose which call at their timestep they were",
        "fisedit_compiler/editing/persistence.py",
        '"batch": key.batch, "occurrence": key.occurrence})', '"batch": key.batch, "occurrence": 0})',
        ("tests/test_persistence.py::test_a_scheduler_that_calls_twice_at_a_timestep_saves_and_loads_every_call",),
    ),
    Mutation(
        "inversion-clean-latents", "every inversion U-Net call is given the clean latents instead of the current",
        "fisedit_compiler/editing/inversion.py",
        "            sample = z if condition is None", "            sample = clean if condition is None",
        ("tests/test_real_images.py::test_inversion_walks_the_trajectory_of_diffusers_ddim_inverse_scheduler",),
    ),
    Mutation(
        "v-prediction-wrong-level", "inversion turns v into noise at the target noise level, not the latents'",
        "fisedit_compiler/editing/inversion.py",
        "            eps = a_prev.sqrt() * output + (1 - a_prev).sqrt() * z",
        "            eps = a_next.sqrt() * output + (1 - a_next).sqrt() * z",
        ("tests/test_real_images.py::test_inversion_walks_the_trajectory_of_diffusers_ddim_inverse_scheduler",),
    ),
    Mutation(
        "detected-mask-undilated", "a session detects its mask without the policy's mask_dilation",
        "fisedit_compiler/editing/session.py",
        "self.mask = detect_mask(diff, self.session.policy.mask_dilation)[0, 0]",
        "self.mask = detect_mask(diff)[0, 0]",
        ("tests/test_editing.py::test_a_session_dilates_its_detected_mask_by_the_policy_s_mask_dilation",),
    ),
    Mutation(
        "dilation-from-two", "detect_mask dilates only from two pixels up (the default of one is skipped)",
        "fisedit_compiler/editing/mask_detection.py",
        "    if dilation:\n", "    if dilation > 1:\n",
        ("tests/test_editing.py::test_a_detected_mask_is_dilated_by_the_given_pixels_and_clipped_at_the_border",),
    ),
    Mutation(
        "mask-image-nearest", "a mask drawn at image resolution is downsampled by its centre pixels, not majority",
        "fisedit_compiler/inputs.py",
        "image.resize((w, h), Image.BOX)", "image.resize((w, h), Image.NEAREST)",
        ("tests/test_masks.py::test_a_mask_drawn_at_image_resolution_marks_the_latent_pixels_mostly_painted",),
    ),
    Mutation(
        "decode-change-all-channels", "a decode counts a pixel changed only when all its channels changed",
        "fisedit_compiler/editing/decoding.py",
        ".any(dim=1).any(dim=0)", ".all(dim=1).any(dim=0)",
        ("tests/test_sparse_decode.py::test_a_latent_pixel_counts_as_changed_when_any_of_its_channels_changed",),
    ),
    Mutation(
        "spill-least-recently-used", "the store lets go of the step needed soonest (LRU), not the one needed last",
        "fisedit_compiler/runtime/tiered_store.py",
        "(at[k] - here) % steps, reverse=True)", "(at[k] - here) % steps, reverse=False)",
        ("tests/test_tiered_cache.py::test_replays_read_from_disk_only_the_steps_the_budget_cannot_hold",),
    ),
    Mutation(
        "unaligned-view", "a mapped tensor at a byte offset its dtype cannot start at is viewed, not copied",
        "fisedit_compiler/runtime/safetensors_io.py",
        "        if (base + begin) % dtype.itemsize:", "        if False:",
        ("tests/test_tiered_cache.py::test_a_safetensors_file_whose_tensors_are_not_aligned_is_read_correctly",),
    ),
    Mutation(
        "fingerprint-without-weights", "a saved session's U-Net fingerprint hashes names and shapes, not the weights",
        "fisedit_compiler/editing/persistence.py",
        "        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())\n", "",
        ("tests/test_persistence.py::test_mismatches_and_damage_are_refused_by_name",),
    ),
    Mutation(
        "coverage-one-more", "an exact-coverage mask takes one pixel more than asked",
        "fisedit_compiler/editing/masks.py",
        "values[k - 1]", "values[min(k, distance.numel() - 1)]",
        ("tests/test_masks.py::test_coverage_mask_keeps_the_nearest_pixels_ties_included",),
    ),
    Mutation(
        "mask-crop-transposed", "a mask drawn on the original picture is cropped with height and width swapped",
        "fisedit_compiler/editing/inversion.py",
        "    box = centre_crop_box(*original_size, width, height)",
        "    box = centre_crop_box(*original_size, height, width)",
        ("tests/test_real_images.py::test_a_mask_drawn_on_the_original_picture_is_cropped_as_the_picture_is",),
    ),
    # the memory bound (issue 39)
    Mutation(
        "pending-own-budget", "an edit run's pending records get a budget of their own, not the session's",
        "fisedit_compiler/editing/session.py",
        "pending = RecordCache(session.cache.dtype, make_store(session.policy, session.memory_budget))",
        "pending = RecordCache(session.cache.dtype, make_store(session.policy))",
        ("tests/test_memory_bound.py::"
         "test_a_session_keeps_all_it_records_within_one_budget_and_edits_as_one_in_memory",),
    ),
    Mutation(
        "record-grows-without-room", "a record that grows past the room made for it makes no more",
        "fisedit_compiler/runtime/tiered_store.py",
        "        if self._filled <= self._room:\n            return\n", "        return\n",
        ("tests/test_memory_bound.py::"
         "test_a_session_keeps_all_it_records_within_one_budget_and_edits_as_one_in_memory",),
    ),
    Mutation(
        "reclaim-live-folders", "spill folders are reclaimed whatever their owner process's state",
        "fisedit_compiler/runtime/tiered_store.py",
        "        if started is None or _process_start(pid) == started:", "        if started is None:",
        ("tests/test_memory_bound.py::test_spill_folders_of_processes_that_are_gone_are_reclaimed_and_no_other",),
    ),
    Mutation(
        "partial-control-overwrites-maps", "an edit with fewer dense steps than control reads replaces the maps",
        "fisedit_compiler/editing/session.py",
        "\"keep_attention_maps\": not self.new_maps", "\"keep_attention_maps\": False",
        ("tests/test_editing.py::test_a_sparse_edit_with_fewer_dense_steps_than_control_reads_keeps_the_source_maps",),
    ),
    Mutation(
        "user-mask-blended-late", "a user's mask is blended only from the switch on, not in held steps before it",
        "fisedit_compiler/editing/session.py",
        "        if self.blend is None:  # a detected mask's control steps", "        if self.region is None:  #",
        ("tests/test_real_images.py::test_a_loaded_photo_round_trips_and_a_user_mask_is_honoured_exactly",),
    ),
    Mutation(
        "maps-for-dense-steps-only", "a source run records maps for the dense steps only, not a word swap's held ones",
        "fisedit_compiler/policy.py",
        "        return max(self.edit_schedule(num_steps)[0], self.hold_layout_schedule(num_steps),\n",
        "        return max(self.edit_schedule(num_steps)[0],\n",
        ("tests/test_editing.py::test_a_word_swap_holds_the_layout_for_its_first_steps_and_an_insertion_does_not",),
    ),
]


def copy_repository(target: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "out", "__pycache__", ".pytest_cache", "*.egg-info")
    for name in ["fisedit_compiler", "tests", "benchmarks"]:
        shutil.copytree(REPO / name, target / name, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", target / "pyproject.toml")


def apply(mutation: Mutation, root: Path) -> None:
    path = root / mutation.file
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name}: its text occurs {count} times in {mutation.file}, not once; "
                         "update the mutation to the current code")
    path.write_text(text.replace(mutation.old, mutation.new))


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    """Run `tests` in `root` with this interpreter (the copy's package shadows the installed one: `-m` puts the
    working directory first on sys.path). Returns pytest's exit code (0 passed, 1 tests failed) and its last line."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    # (-m: a mutation's tests run whether marked slow or not; pyproject's addopts deselect slow ones)
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow", *tests]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, lines[-1] if lines else done.stderr.strip()[-200:]


def check_copy_is_imported(root: Path) -> None:
    code = "import fisedit_compiler, pathlib; print(pathlib.Path(fisedit_compiler.__file__).resolve())"
    where = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(root.resolve())):
        raise SystemExit(f"the copy's package is not the one imported ({where}): mutations would not be seen")


def try_mutation(mutation: Mutation) -> tuple[int, str, float]:
    """Apply `mutation` to a fresh copy of the repository and run its tests there: pytest's exit code, its last
    line, the seconds taken."""
    with tempfile.TemporaryDirectory(prefix="fisedit-mutation-") as tmp:
        root = Path(tmp)
        copy_repository(root)
        apply(mutation, root)
        start = time.perf_counter()
        code, last_line = run_tests(root, mutation.tests)
    return code, last_line, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--jobs", type=int, default=2, help="mutations tested at once (default 2)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip running the tests unmutated first (CI: the suite has just passed)")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:32} {m.what}")
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; --list shows them")
    selected = [known[n] for n in args.names] if args.names else MUTATIONS

    with tempfile.TemporaryDirectory(prefix="fisedit-mutation-") as tmp:  # the tests must pass unmutated
        root = Path(tmp)
        copy_repository(root)
        check_copy_is_imported(root)
        if not args.no_baseline:
            code, last_line = run_tests(root, tuple(dict.fromkeys(t for m in selected for t in m.tests)))
            if code != 0:
                raise SystemExit(f"the tests fail without any mutation ({last_line}): fix them first")
            print(f"unmutated: {last_line}", flush=True)

    survivors = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for mutation, (code, last_line, seconds) in zip(selected, pool.map(try_mutation, selected)):
            # only failing tests kill a mutation; an import or collection error (exit code 2+) says nothing
            verdict = {0: "SURVIVED", 1: "killed"}.get(code, "ERROR")
            print(f"{verdict:8} {mutation.name:32} {seconds:6.1f}s  {last_line}", flush=True)
            if code != 1:
                survivors.append(mutation.name)
    print(f"\n{len(selected) - len(survivors)} of {len(selected)} mutations killed"
          + (f"; not killed: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
