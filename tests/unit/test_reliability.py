"""Reliability pieces that need no process group: atomic publication and its crash fallbacks, the file
manifest (truncated / missing / corrupted shard -> error naming the file, through `load_checkpoint` itself),
retention, the stop guard (signals, deadline), the process group's teardown at exit, the fault-injection hooks and the config checks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from stepwise.checkpoint import layout
from stepwise.checkpoint.retention import prune, steps_to_delete
from stepwise.checkpoint.state import load_checkpoint
from stepwise.parallel import inject
from stepwise.train.guard import REQUEUE_EXIT_CODE, Requeue, StopGuard, deadline_near


def stage(root, step: int, payload: bytes = b"x" * 100):
    staged = layout.staging_dir(root, step)
    (staged / "__0_0.distcp").write_bytes(payload)
    (staged / "sub").mkdir()
    (staged / "sub" / "common.pt").write_bytes(b"common")
    layout.fsync_tree(staged)
    return layout.publish(root, step, {"step": step})


def test_publish_renames_into_place_repoints_latest_and_records_file_sizes(tmp_path):
    stage(tmp_path, 2)
    final = stage(tmp_path, 4)
    assert layout.latest_iteration(tmp_path) == final
    assert layout.read_meta(final)["files"] == {"__0_0.distcp": 100, "sub/common.pt": 6}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".latest*"))
    again = stage(tmp_path, 4, b"y" * 7)  # the same step again replaces it
    assert layout.read_meta(again)["files"]["__0_0.distcp"] == 7 and not list(tmp_path.glob("*.old"))


def test_latest_falls_back_to_the_copy_moved_aside_while_replacing_it(tmp_path):
    final = stage(tmp_path, 4)
    os.replace(final, tmp_path / "iter_0000004.old")  # a crash between publish()'s two renames
    assert layout.latest_iteration(tmp_path).name == "iter_0000004.old"
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(layout.CheckpointError, match="latest: points to 'iter_0000009'"):
        layout.latest_iteration(tmp_path)


def test_truncated_or_missing_shard_fails_loading_naming_the_file(tmp_path):
    final = stage(tmp_path, 2)
    shard = final / "__0_0.distcp"
    shard.write_bytes(b"x" * 60)
    with pytest.raises(layout.CheckpointError, match=rf"{shard}: 60 bytes, 100 when published \(truncated"):
        load_checkpoint(tmp_path, model=None)  # fails before megatron reads anything
    shard.unlink()
    with pytest.raises(layout.CheckpointError, match=rf"{shard}: missing"):
        load_checkpoint(tmp_path, model=None)
    (final / layout.META).write_text('{"step": 2, "fi')
    with pytest.raises(layout.CheckpointError, match="stepwise.json: unreadable"):
        load_checkpoint(tmp_path, model=None)


def test_a_corrupted_shard_of_the_same_size_fails_loading_naming_the_file(tmp_path):
    final = stage(tmp_path, 2)
    assert layout.read_meta(final)["crc32"] == {"__0_0.distcp": layout.crc32(final / "__0_0.distcp"),
                                                "sub/common.pt": layout.crc32(final / "sub" / "common.pt")}
    shard = final / "__0_0.distcp"
    shard.write_bytes(b"x" * 50 + b"y" + b"x" * 49)  # one byte flipped, size unchanged
    with pytest.raises(layout.CheckpointError, match=rf"{shard}: CRC-32 [0-9a-f]{{8}}, [0-9a-f]{{8}} when published \(corrupt"):
        load_checkpoint(tmp_path, model=None)


def test_a_file_is_checksummed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    final = stage(tmp_path, 2)
    meta, reads = layout.read_meta(final), []
    real = layout.crc32
    monkeypatch.setattr(layout, "crc32", lambda path: reads.append(path.name) or real(path))
    layout.verify_checksums(final, meta)
    layout.verify_checksums(final, meta)  # a second model from the same checkpoint: nothing read again
    assert sorted(reads) == ["__0_0.distcp", "common.pt"]
    shard = final / "__0_0.distcp"
    shard.write_bytes(b"x" * 50 + b"y" + b"x" * 49)
    os.utime(shard, ns=(1, 1))  # changed since (another mtime): checked again, and caught
    with pytest.raises(layout.CheckpointError, match="when published \\(corrupt"):
        layout.verify_checksums(final, meta)


def test_a_checkpoint_is_verified_once_across_processes_until_a_file_changes(tmp_path, monkeypatch):
    """pi0 is read by many launched steps: the first verification leaves stamps, later processes trust
    them while the files are unchanged (another mtime or size: checked again, and caught)."""
    final = stage(tmp_path, 2)
    meta, reads = layout.read_meta(final), []
    layout.verify_checksums(final, meta)
    assert sorted(p.name for p in (final / layout.VERIFIED_STAMPS).iterdir()) == ["__0_0.distcp", "sub%common.pt"]
    monkeypatch.setattr(layout, "_VERIFIED", set())  # a new process
    real = layout.crc32
    monkeypatch.setattr(layout, "crc32", lambda path: reads.append(path.name) or real(path))
    layout.verify_checksums(final, meta)
    assert reads == []
    shard = final / "__0_0.distcp"
    shard.write_bytes(b"x" * 50 + b"y" + b"x" * 49)
    os.utime(shard, ns=(1, 1))
    with pytest.raises(layout.CheckpointError, match="when published \\(corrupt"):
        layout.verify_checksums(final, meta)
    assert reads == ["__0_0.distcp"]


def test_each_rank_flushes_and_checksums_only_the_files_it_wrote():
    names = ["__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__12_0.distcp", ".metadata", "common.pt", "metadata.json"]

    def written_by(rank):
        return [name for name in names if layout.writer_rank(name, 16) == rank]

    assert written_by(0) == ["__0_0.distcp", "__0_1.distcp", ".metadata", "common.pt", "metadata.json"]
    assert written_by(1) == ["__1_0.distcp"] and written_by(12) == ["__12_0.distcp"] and written_by(2) == []


def test_retention_keeps_the_last_k_every_mth_and_latest():
    steps = [100, 200, 300, 400, 500, 600, 700]
    assert steps_to_delete(steps, 700, keep_last=2, keep_every=0) == [100, 200, 300, 400, 500]
    assert steps_to_delete(steps, 700, keep_last=2, keep_every=300) == [100, 200, 400, 500]
    assert steps_to_delete(steps, 300, keep_last=1, keep_every=0) == [100, 200, 400, 500, 600]


def test_prune_deletes_only_after_publication_and_clears_crash_leftovers(tmp_path):
    for step in (1, 2, 3):
        stage(tmp_path, step)
    (tmp_path / "iter_0000009.tmp").mkdir()  # a crashed save
    (tmp_path / "latest").write_text("iter_0000002\n")  # an operator rolled back
    gone = prune(tmp_path, keep_last=1, keep_every=0)
    assert sorted(p.name for p in gone) == ["iter_0000001", "iter_0000009.tmp"]
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000002", "iter_0000003"]
    assert prune(tmp_path / "empty", keep_last=1, keep_every=0) == []


def test_stop_guard_turns_a_signal_into_a_stop_reason_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopGuard(max_wall_minutes=None) as guard:
        assert guard.agreed_reason() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert guard.agreed_reason() == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert guard.agreed_reason() == "SIGTERM"
    assert signal.getsignal(signal.SIGUSR1) == before
    stop = Requeue("stopping")
    assert stop.code == REQUEUE_EXIT_CODE == 75 and str(stop) == "stopping"


def test_deadline_reserves_one_step_and_one_save():
    assert not deadline_near(elapsed_s=6.0, budget_s=10.0, step_s=1.0, save_s=2.0)
    assert deadline_near(elapsed_s=7.0, budget_s=10.0, step_s=1.0, save_s=2.0)
    guard = StopGuard(max_wall_minutes=1.0, started=time.time() - 50.0)
    guard.record_step(2.0)
    assert guard.agreed_reason() is None  # 50 + 2 + 2 (a step's time stands in for the unmeasured save)
    guard.record_save(9.0)
    assert guard.agreed_reason() == "train.max_wall_minutes is about to run out"


def test_injection_hooks_are_inert_unless_their_variable_names_this_rank_and_step(monkeypatch):
    def loss(batch, outputs):
        return 2.0, {}

    assert inject.nan_loss(loss, 0, 3) is loss
    monkeypatch.setenv(inject.NAN_ENV, "1:3")
    assert inject.nan_loss(loss, 0, 3) is loss and inject.nan_loss(loss, 1, 2) is loss
    value, _ = inject.nan_loss(loss, 1, 3)(None, None)
    assert value != value  # NaN
    monkeypatch.setenv(inject.KILL_ENV, "staged:x")
    with pytest.raises(ValueError, match="STEPWISE_KILL_AT"):
        inject.kill_point("staged", 1)
    monkeypatch.setenv(inject.KILL_ENV, "staged:4")
    inject.kill_point("renamed", 4)  # another phase: nothing happens


@pytest.mark.parametrize("override, message", [
    ("sft.nan_policy=ignore", "sft.nan_policy='ignore' is not one of"),
    ("critic.data_errors=loose", "critic.data_errors='loose' is not one of"),
    ("sft.keep_last=0", "sft.keep_last=0 must be >= 1"),
    ("policy.max_wall_minutes=0", "policy.max_wall_minutes=0.0 must be > 0"),
    ("sft.max_bad_fraction=1.5", "sft.max_bad_fraction=1.5 must be in [0, 1)"),
])
def test_bad_reliability_settings_fail_at_load_naming_the_key(override, message):
    from pathlib import Path

    from stepwise.config import ConfigError, load_recipe

    recipe = Path(__file__).resolve().parents[2] / "recipes/base/tiny_arith.yaml"
    with pytest.raises(ConfigError) as caught:
        load_recipe(recipe, [override])
    assert message in str(caught.value)


def test_the_process_group_is_torn_down_at_exit_while_the_interpreter_is_whole():
    """A gloo group left to interpreter finalisation can SIGABRT the process (seen in CI: "terminate
    called without an active exception"); init_distributed registers the teardown with atexit."""
    script = ("import atexit, torch.distributed as dist\n"
              "atexit.register(lambda: print('initialised at exit:', dist.is_initialized()))\n"
              "from stepwise.parallel.runtime import init_distributed\n"
              "init_distributed(); init_distributed()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "initialised at exit: False" in result.stdout
