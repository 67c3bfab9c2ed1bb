"""What a broker kill loses of what it had acknowledged, with the project's broker (saving every second) and with
one saving on every change.

Each round publishes 50 retained messages, waits for every acknowledgement, kills mosquitto at
once (SIGKILL), restarts it and counts what it no longer holds. Run: .venv/bin/python bench/bench_broker_kill.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import broker_saving_on_every_change, free_port  # noqa: E402
from hacer.bus import Bus, Message  # noqa: E402
from hacer.topics import Topics  # noqa: E402
from ops.broker import CONFIG_DIR, BrokerProcess  # noqa: E402

MESSAGES = 50


def lost_after_kills(folder: Path, template: Path, rounds: int) -> int:
    """Acknowledged retained messages missing after `rounds` kills."""
    broker = BrokerProcess(folder, [free_port()], template=template)
    broker.start()
    lost = 0
    try:
        for round_number in range(rounds):
            expected = {
                f"hacer/nodes/{index}/meta": f'{{"round": {round_number}}}'.encode() for index in range(MESSAGES)
            }
            publisher = Bus(broker.url, Topics(), f"bench-kill-{uuid.uuid4().hex[:8]}")
            publisher.start()
            publisher.wait_connected(10)
            publisher.publish_confirmed(list(expected.items()), retain=True)
            broker.restart(kill=True)
            publisher.stop()
            held: dict[str, bytes] = {}

            def keep(message: Message, held: dict[str, bytes] = held) -> None:
                held[message.topic] = message.payload

            reader = Bus(broker.url, Topics(), f"bench-read-{uuid.uuid4().hex[:8]}")
            reader.subscribe("hacer/nodes/+/meta", keep)
            reader.start()
            reader.wait_connected(10)
            reader.sync()
            reader.stop()
            lost += sum(held.get(topic) != payload for topic, payload in expected.items())
    finally:
        broker.stop()
    return lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    total = args.rounds * MESSAGES
    with tempfile.TemporaryDirectory() as folder:
        every_second = lost_after_kills(Path(folder) / "every-second", CONFIG_DIR / "dev.conf", args.rounds)
        every_change = lost_after_kills(
            Path(folder) / "every-change", broker_saving_on_every_change(Path(folder)), args.rounds
        )
    print(f"acknowledged, then lost to a kill right after ({args.rounds} kills, {total} messages):")
    print(f"  project's broker (saves every second):  {every_second} ({every_second / total:.1%})")
    print(f"  broker saving on every change:          {every_change} ({every_change / total:.1%})")


if __name__ == "__main__":
    main()
