"""Runner parts without processes: output splitting and limits, the script channel, the catalog, the outbox."""

import fcntl
import os
import subprocess
import sys
import threading
import time

import pytest

from hacer.scriptdir import ScriptDir, script_id
from runner.output import HELD_OPEN, OutputSplitter, read_output
from runner.threads import ThreadPool
from scripting import decode_line, encode_entry

from support import wait_until


def test_lines_split_across_reads():
    splitter = OutputSplitter()
    assert splitter.feed(b"hel") == []
    assert splitter.feed(b"lo\nwor") == [("output", "hello")]
    assert splitter.feed(b"ld\r\n\n") == [("output", "world"), ("output", "")]
    assert splitter.finish() == []


def test_structured_entries_pass_and_forged_ones_do_not():
    splitter = OutputSplitter()
    line = encode_entry("sent_set", '"on": "1"').encode()
    forged = encode_entry("output", "x").replace("output", "exit_status").encode()
    assert splitter.feed(line + forged) == [("sent_set", '"on": "1"'), ("output", forged.decode().rstrip("\n"))]


def test_long_lines_and_total_limit_are_cut_and_said():
    splitter = OutputSplitter(line_limit=10, total_limit=60)
    entries = splitter.feed(b"x" * 25 + b"\nshort\n" + b"y" * 30)
    entries += splitter.feed(b"yyy\nmore\nand more\n") + splitter.finish()
    assert entries[0] == ("output", "xxxxxxxxxx [hacer: 15 more bytes of this line cut]")
    assert entries[1] == ("output", "short")
    assert len(entries) == 3 and "output cut" in entries[-1][1]
    assert splitter.cut_lines == 2


def test_scripts_are_found_only_in_the_listing(tmp_path):
    (tmp_path / "lamp.py").write_text("")
    (tmp_path / "_helper.py").write_text("")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.py").write_text("")
    (tmp_path / "folder.py").mkdir()
    scripts = ScriptDir(tmp_path)
    assert [s.name for s in scripts.list()] == ["lamp"]
    assert scripts.find("lamp").path == tmp_path / "lamp.py" and scripts.find("lamp.py")
    for name in ("../lamp", "sub/x", "_helper", str(tmp_path / "lamp"), "notes", "folder"):
        assert scripts.find(name) is None
    assert ScriptDir(tmp_path / "gone").list() == [] and ScriptDir(tmp_path / "gone").find("lamp") is None
    assert scripts.find_id(script_id("lamp")).name == "lamp"
    assert script_id("lamp") == int(__import__("hashlib").md5(b"lamp").hexdigest()[:8], 16)


def test_decode_line_is_lenient():
    assert decode_line("plain") == ("output", "plain")
    assert decode_line("\x1ehacer-entry {bad json") == ("output", "\x1ehacer-entry {bad json")


# --- the outbox: held in the database until recorded ------------------------------------------


@pytest.fixture
def outbox_of(tmp_path):
    from hacer.models import Database
    from runner.outbox import Outbox

    database = Database(f"sqlite:///{tmp_path / 'outbox.db'}")
    database.init()
    now = [0.0]

    def make(runner_id="a", **options):
        return Outbox(database.engine, runner_id, clock=lambda: now[0], **options)

    make.now = now
    return make


def test_the_outbox_holds_until_recorded_and_resends_what_waited(outbox_of):
    from hacer.messages import RunRecorded

    outbox = outbox_of(resend_after=5.0)
    outbox.hold("r", [(seq, "t/log", b"e%d" % seq) for seq in (1, 2, 3)])
    outbox.hold("r", status=("running", "t/status", b"running"))
    outbox_of.now[0] = 1.0
    assert outbox.due() == []  # not waited long enough
    outbox.confirm(RunRecorded("r", 2, "queued"))
    outbox.confirm(RunRecorded("other", 9, "succeeded"))  # another runner's run: nothing to do
    outbox.apply()
    assert outbox.held("r") == ([3], "running")
    outbox_of.now[0] = 6.0
    assert outbox.due() == [("t/log", b"e3"), ("t/status", b"running")]
    outbox_of.now[0] = 7.0
    assert outbox.due() == []  # just sent again
    assert outbox.due(everything=True) == [("t/log", b"e3"), ("t/status", b"running")]
    outbox.hold("r", status=("succeeded", "t/status", b"succeeded"))
    outbox.confirm(RunRecorded("r", 3, "succeeded"))
    outbox.apply()
    assert outbox.held("r") == ([], None) and outbox.due(everything=True) == []


def test_what_is_confirmed_is_deleted_with_the_next_write_or_after_a_while(outbox_of):
    from sqlalchemy import func, select

    from hacer.messages import RunRecorded
    from hacer.models import RunOutbox

    def rows(outbox) -> int:
        with outbox.engine.begin() as connection:
            return connection.scalar(select(func.count()).select_from(RunOutbox))

    outbox = outbox_of(resend_after=0.0, let_go_after=60.0)
    outbox.hold("one", [(1, "t/log", b"e1")], status=("succeeded", "t/status", b"succeeded"))
    outbox.confirm(RunRecorded("one", 1, "succeeded"))
    outbox.apply()
    assert rows(outbox) == 2  # confirmed, kept until a later write: no commit of its own
    assert outbox.held("one") == ([], None) and outbox.due() == []  # and never sent again
    outbox.hold("two", [(1, "t/log", b"f1")], driver=None, let_go=False)  # a run's start lets nothing go
    assert rows(outbox) == 3
    outbox.hold("two", [(2, "t/log", b"f2")])  # its next write does, in the same transaction
    assert rows(outbox) == 2 and outbox.held("two") == ([1, 2], None)
    outbox.confirm(RunRecorded("two", 2, "running"))
    outbox.apply()
    outbox_of.now[0] = 59.0
    outbox.apply()
    assert rows(outbox) == 2
    outbox_of.now[0] = 61.0
    outbox.apply()  # nothing written for a minute: let go in a transaction of its own
    assert rows(outbox) == 0


def test_a_recorded_end_confirms_any_status_held(outbox_of):
    from hacer.messages import RunRecorded

    outbox = outbox_of()
    outbox.hold("r", status=("running", "t/status", b"running"))
    outbox.confirm(RunRecorded("r", 0, "lost"))  # taken over and ended by another runner
    outbox.apply()
    assert outbox.held("r") == ([], None)


def test_a_runner_taking_over_adopts_what_the_dead_one_held(outbox_of):
    dead, alive = outbox_of("dead"), outbox_of("alive")
    dead.hold("r", [(1, "t/log", b"e1")])
    dead.hold("r", status=("succeeded", "t/status", b"succeeded"))
    assert alive.due(everything=True) == []
    assert alive.adopt("dead") == 1
    assert alive.due(everything=True) == [("t/log", b"e1"), ("t/status", b"succeeded")]
    assert dead.due(everything=True) == []


def test_the_outbox_is_bounded_and_gives_up_on_what_is_never_confirmed(outbox_of):
    outbox = outbox_of(resend_after=0.0, max_bytes=1000, max_sends=3)
    outbox.hold("old", [(seq, "t/log", b"x" * 100) for seq in range(1, 51)])
    outbox.hold("new", [(seq, "t/log", b"x" * 100) for seq in range(51, 101)])
    outbox.bound()  # 100 entries of 100 bytes: ten times the bound
    assert outbox.dropped == 90
    assert outbox.held("old") == ([], None) and outbox.held("new")[0] == list(range(91, 101))
    assert len(outbox.due()) == 10 and len(outbox.due()) == 10
    assert outbox.due() == [] and outbox.gave_up == 10 and outbox.held("new") == ([], None)


def test_a_nul_in_output_becomes_a_replacement_character():
    # No database text column holds a NUL (PostgreSQL refuses it): the runner never sends one.
    splitter = OutputSplitter()
    entries = splitter.feed(b"a\x00b\n" + encode_entry("sent_get", "k\x00").encode())
    assert entries == [("output", "a\ufffdb"), ("sent_get", "k\ufffd")]


# --- leftovers: which processes can be a run's ------------------------------------------------


@pytest.mark.parametrize(
    ("since", "now", "expected"),
    [
        ((1000, 50), (1003, 53), [1001, 1003]),  # pids handed out since: after 1000, up to 1003
        ((4190000, 50), (400, 60), [4190001, 301, 400]),  # the counter went round past pid_max
        ((1000, 50), (1003, 50 + 4194304), "all"),  # went all the way round: nothing can be ruled out
        ((-1, 0), (1003, 53), "all"),  # no mark at launch
    ],
)
def test_leftovers_are_looked_for_among_the_processes_created_since_the_launch(monkeypatch, since, now, expected):
    from runner import leftovers

    pids = [1, 999, 1000, 1001, 1003, 301, 400, 500, 4190000, 4190001]
    monkeypatch.setattr(leftovers.os, "listdir", lambda path: [str(pid) for pid in pids] + ["self", "stat"])
    monkeypatch.setattr(leftovers, "birth", lambda: leftovers.Birth(*now))
    monkeypatch.setattr(leftovers, "_read", lambda path: b"4194304\n")
    found = leftovers._created_since(leftovers.Birth(*since))
    assert sorted(found) == sorted(pids if expected == "all" else expected)


def test_a_claim_is_synced_to_survive_a_power_cut_after_its_commit_and_held_lines_only_committed(tmp_path, monkeypatch):
    """SQLite commits at synchronous=NORMAL; a claim's change then has its WAL synced, and `committed` runs between."""
    from hacer import models
    from hacer.models import Database, driver_connection
    from runner.claims import ClaimStore
    from runner.outbox import Outbox

    path = tmp_path / "claims.db"
    database = Database(f"sqlite:///{path}", pool_size=1, max_overflow=0)
    database.init()
    claims, outbox = ClaimStore(database.engine, "r"), Outbox(database.engine, "r")
    other = Database(f"sqlite:///{path}").engine  # another process's view
    events = []

    def noting(kind, sync):
        def noted(fd):
            events.append((kind, os.readlink(f"/proc/self/fd/{fd}")))
            sync(fd)

        return noted

    monkeypatch.setattr(models.os, "fdatasync", noting("fdatasync", os.fdatasync))
    monkeypatch.setattr(models.os, "fsync", noting("fsync", os.fsync))

    def committed(run_id):
        with other.connect() as connection:
            seen = connection.exec_driver_sql("SELECT state FROM run_claim WHERE run_id = ?", (run_id,)).scalar()
        events.append(("committed", seen))

    levels = []

    def level(driver):
        levels.append(driver.execute("PRAGMA synchronous").fetchone()[0])

    claims.claim("run", "{}", also=level, committed=lambda: committed("run"))
    assert events == [("committed", "queued"), ("fdatasync", f"{path}-wal"), ("fsync", str(tmp_path))]
    events.clear()
    assert claims.move("run", state="running", committed=lambda: committed("run"))
    assert events == [("committed", "running"), ("fdatasync", f"{path}-wal")]  # the WAL's name is on disk already
    events.clear()
    assert not claims.move("run", from_states=("queued",), state="running", committed=lambda: committed("run"))
    outbox.hold("run", [(1, "t", b"line")])
    with database.engine.connect() as connection:
        level(driver_connection(connection))
    assert events == [] and levels == [1, 1]  # NORMAL throughout: nothing toggles it per transaction


# --- reading a run's pipe: to its end, or until its deadline -----------------------------------


def _read_all(fd, deadline):
    entries = []
    read_output(fd, OutputSplitter(), lambda: deadline, entries.extend)
    return entries


def test_a_late_reader_still_reads_everything_an_ended_writer_left_in_the_pipe():
    read_end, write_end = os.pipe()
    os.write(write_end, b"".join(b"line %d\n" % i for i in range(1000)))
    os.close(write_end)
    # The reaper's deadline passed long before the reader got to the pipe (a busy machine).
    entries = _read_all(read_end, time.monotonic() - 60)
    os.close(read_end)
    assert entries == [("output", f"line {i}") for i in range(1000)]


def test_a_pipe_held_open_by_a_process_nobody_could_end_is_closed_at_the_deadline():
    read_end, write_end = os.pipe()
    os.write(write_end, b"left\npartial")
    entries = _read_all(read_end, time.monotonic() - 60)
    os.close(write_end)
    os.close(read_end)
    assert entries == [("output", "left"), ("output", "partial"), ("output", HELD_OPEN)]


def test_a_writer_that_never_stops_cannot_keep_the_reader_past_the_deadline():
    read_end, write_end = os.pipe()
    writer = subprocess.Popen(
        [sys.executable, "-c", "import os\nwhile True: os.write(1, b'x' * 4096 + b'\\n')"], stdout=write_end
    )
    os.close(write_end)
    pipe_size = fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ)
    try:
        entries = _read_all(read_end, time.monotonic())
    finally:
        writer.kill()
        writer.wait()
        os.close(read_end)
    assert entries[-1] == ("output", HELD_OPEN)
    assert sum(len(data) + 1 for _, data in entries[:-1]) <= pipe_size + 65536  # one read more at most


def test_the_thread_pool_never_makes_a_job_wait_and_reuses_waiting_threads():
    pool = ThreadPool("test")
    for _ in range(2):
        together = threading.Barrier(6, timeout=10)  # five jobs that each wait for all the others
        for _ in range(5):
            pool.submit(together.wait)
        together.wait()
        wait_until(lambda: pool._idle == 5, 10, "the five threads to be waiting again")
    assert pool.threads == 5  # the second five ran on the first five's threads
