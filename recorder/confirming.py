"""Confirmations to runners: after each commit, what is written of every run the batch touched."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hacer.bus import Bus
from hacer.messages import RunRecorded, RunsRecorded
from hacer.models import Run, ScriptLogEntry
from hacer.topics import Topics

# The runs a batch touched: run id -> (thread id, state if known, seqs of the entries written)
Touched = dict[str, tuple[int, "str | None", list[int]]]


class Confirmer:
    """Publishes `runs/recorded`: per run, its log entries 1..n written without a gap, and its state."""

    def __init__(
        self, bus: Bus, topics: Topics, sessions: sessionmaker[Session], recorder_id: str, run_states: dict[str, str]
    ) -> None:
        self.bus = bus
        self.topics = topics
        self.sessions = sessions
        self.recorder_id = recorder_id
        self.run_states = run_states  # run id -> the state this recorder last wrote or read (shared with the writer)
        # run id -> (n, seqs above n): log entries 1..n known written, and the later ones this recorder wrote
        self._watermarks: dict[str, tuple[int, set[int]]] = {}

    def publish(self, touched: Touched) -> None:
        """Say what is written of each run a batch touched (QoS 0: a lost one only costs a resend).

        A run's state is the one this recorder last wrote or read: another recorder may have moved
        it on since, which only delays a confirmation (runners hold what is not confirmed).
        """
        if not touched:
            return
        with self.sessions() as session:
            unknown = [run_id for run_id, (_, state, _) in touched.items() if state is None]
            if unknown:
                self.run_states.update(
                    session.execute(select(Run.run_id, Run.state).where(Run.run_id.in_(unknown))).tuples().all()
                )
            runs = [
                RunRecorded(
                    run_id, self._watermark(session, run_id, thread_id, seqs), state or self.run_states.get(run_id, "")
                )
                for run_id, (thread_id, state, seqs) in touched.items()
            ]
        # One message a batch: the broker's work is per message, and it is what sets the pace.
        self.bus.publish(
            self.topics.build("runs_recorded"), RunsRecorded.of(self.recorder_id, runs).to_payload(), qos=0
        )

    def _watermark(self, session: Session, run_id: str, thread_id: int, written: list[int]) -> int:
        """The n such that log entries 1..n of a run are all written.

        From what this recorder wrote when that leaves no gap (no query); else from the database,
        read on from the last known n (entries another recorder, or an earlier process, wrote).
        """
        known, above = self._watermarks.get(run_id, (0, set()))
        above.update(written)
        while known + 1 in above:
            above.remove(known + 1)
            known += 1
        if above:
            for seq in session.scalars(
                select(ScriptLogEntry.seq)
                .where(ScriptLogEntry.thread_id == thread_id, ScriptLogEntry.seq > known)
                .order_by(ScriptLogEntry.seq)
            ):
                if seq != known + 1:
                    break
                known = seq
            above = {seq for seq in above if seq > known}
        if len(self._watermarks) > 100_000:
            self._watermarks.clear()
            self.run_states.clear()
        self._watermarks[run_id] = (known, above)
        return known
