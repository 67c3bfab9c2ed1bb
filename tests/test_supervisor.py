"""runserver's supervisor with small parts: output prefixed line by line, a dead part restarted, stop ends all."""

import logging
import os
import signal
import threading

from hacer.supervisor import Part, Supervisor

from conftest import wait_until


def short() -> None:
    os.write(1, b"first\nhalf a ")
    os.write(2, b"line\n")
    os.write(2, b"unfinished")  # a last line without its newline: ended by the supervisor
    raise SystemExit(3)


def test_output_is_prefixed_and_a_dead_part_restarted(capfd, caplog):
    caplog.set_level(logging.ERROR, "hacer.supervisor")
    supervisor = Supervisor([Part("short", short)])

    def stop_after_the_second_exit() -> None:
        exits = lambda: [r for r in caplog.records if r.getMessage() == "short exited with 3; restarting it"]  # noqa: E731
        try:
            wait_until(lambda: len(exits()) >= 2, 30, "two exits")
        finally:
            supervisor.stop()

    threading.Thread(target=stop_after_the_second_exit, daemon=True).start()
    supervisor.run()
    err = capfd.readouterr().err
    assert err.count("   short | first\n   short | half a line\n   short | unfinished\n") >= 2, err


def test_stop_ends_every_part(capfd):
    def sleeper() -> None:
        os.write(1, b"up\n")  # (print() would go to pytest's capture, not to fd 1)
        signal.pause()

    supervisor = Supervisor([Part("sleeper", sleeper), Part("other", sleeper)])
    seen = []

    def stop_once_both_are_up() -> None:
        try:
            for name in ("sleeper", "other"):
                wait_until(lambda n=name: seen.append(capfd.readouterr().err) or f"{n} | up" in "".join(seen), 30, name)
        finally:
            supervisor.stop()

    threading.Thread(target=stop_once_both_are_up, daemon=True).start()
    pids = []
    original = supervisor._start
    supervisor._start = lambda part: (original(part), pids.append(part.pid))  # type: ignore[method-assign]
    supervisor.run()
    assert [part.pid for part in supervisor.parts] == [0, 0]
    assert len(pids) == 2 and not [pid for pid in pids if os.path.exists(f"/proc/{pid}")], "a part outlived stop()"
