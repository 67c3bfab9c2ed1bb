"""The topic tree: the only module that builds or parses hacer topic strings.

Every topic is declared once in TOPIC_SPECS (pattern relative to the prefix, retained or not,
QoS, publisher); `Topics` applies the configured prefix, builds concrete topics and
subscription filters, and parses incoming topics back into (name, argument).
docs/topics.md documents the same table and a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

from hacer.nodewire import MAX_NODE_ID


@dataclass(frozen=True)
class TopicSpec:
    """One topic of the bus contract."""

    name: str
    pattern: str  # relative to the prefix; "{arg}" stands for the one variable level
    retained: bool
    qos: int
    publisher: str
    payload: str = ""  # its payload's schema in hacer.schemas.json_schemas(); "" for plain text


TOPIC_SPECS: tuple[TopicSpec, ...] = (
    TopicSpec("bridge_state", "bridge/state", True, 1, "bridge"),
    TopicSpec("bridge_stats", "bridge/stats", True, 0, "bridge", "BridgeStats"),
    TopicSpec("bridge_lastseen", "bridge/lastseen", False, 0, "bridge", "LastSeenBatch"),
    TopicSpec("node_presence", "nodes/{arg}/presence", True, 1, "bridge", "Presence"),
    TopicSpec("node_meta", "nodes/{arg}/meta", True, 1, "api", "NodeMeta"),
    TopicSpec("node_state", "nodes/{arg}/state", True, 1, "bridge", "NodeValues"),
    TopicSpec("node_readings", "nodes/{arg}/readings", True, 1, "bridge", "NodeReadings"),
    TopicSpec("node_set", "nodes/{arg}/set", False, 1, "anyone allowed", "SetCommand"),
    TopicSpec("node_get", "nodes/{arg}/get", False, 1, "anyone allowed", "GetCommand"),
    TopicSpec("node_result", "nodes/{arg}/result", False, 1, "bridge", "CommandResult"),
    TopicSpec("run_request", "runs/request", False, 1, "api, CLI, scripts, third parties", "RunRequestPayload"),
    TopicSpec("run_status", "runs/{arg}/status", False, 1, "runner", "RunStatus"),
    TopicSpec("run_log", "runs/{arg}/log", False, 1, "runner", "LogEntry"),
    TopicSpec("run_cancel", "runs/{arg}/cancel", False, 1, "api, anyone allowed"),
    TopicSpec("runs_recorded", "runs/recorded", False, 0, "recorder", "RunsRecorded"),
    TopicSpec("runner_state", "runners/{arg}/state", True, 1, "runner", "RunnerState"),
    TopicSpec("recorder_state", "recorders/{arg}/state", True, 1, "recorder", "RecorderState"),
    TopicSpec("api_state", "api/state", True, 1, "api"),
    TopicSpec("scheduler_state", "schedulers/{arg}/state", True, 1, "scheduler"),
    TopicSpec("automation", "automations/{arg}", True, 1, "scheduler", "AutomationState"),
    TopicSpec("automation_fired", "automations/{arg}/fired", False, 1, "scheduler", "AutomationFired"),
    TopicSpec("automation_held", "automations/{arg}/held", False, 1, "scheduler", "AutomationHeldBack"),
    TopicSpec("automation_step", "automations/{arg}/step", False, 1, "scheduler", "AutomationStepEnded"),
    TopicSpec("client_sync", "clients/{arg}/sync", False, 1, "any hacer process, to itself"),
    # A node command answered on its sender's response topic: the broker's ACL lets a client
    # publish here under its own client id only, so the answer goes to that client alone.
    TopicSpec("client_command", "clients/{arg}/command", False, 1, "any client, under its own id", "ClientCommand"),
    # A client's response topic: the results of the commands it sent on its own command topic.
    TopicSpec("reply", "replies/{arg}", False, 1, "bridge, to a command's response topic", "CommandResult"),
)


SPECS_BY_NAME = {spec.name: spec for spec in TOPIC_SPECS}


class TopicError(ValueError):
    """A topic or topic argument that hacer cannot use."""


def _check_level(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in "/+#\0"):
        raise TopicError(f"{text!r} cannot be a topic level")
    return text


class Topics:
    """Builds and parses the topics under one prefix."""

    def __init__(self, prefix: str = "hacer") -> None:
        self.prefix = prefix.strip("/")

    def build(self, name: str, arg: object = None) -> str:
        """Return the concrete topic `name` (with its one argument, when it has one)."""
        pattern = SPECS_BY_NAME[name].pattern
        if "{arg}" in pattern:
            if arg is None:
                raise TopicError(f"topic {name} needs an argument")
            pattern = pattern.replace("{arg}", _check_level(arg))
        elif arg is not None:
            raise TopicError(f"topic {name} takes no argument")
        return f"{self.prefix}/{pattern}"

    def filter(self, name: str) -> str:
        """Return the subscription filter matching every topic `name`."""
        return f"{self.prefix}/{SPECS_BY_NAME[name].pattern.replace('{arg}', '+')}"

    def everything(self) -> str:
        """Return the filter for the whole tree."""
        return f"{self.prefix}/#"

    @staticmethod
    def shared(group: str, topic_filter: str) -> str:
        """Return an MQTT 5 shared subscription of `group` to `topic_filter`."""
        return f"$share/{_check_level(group)}/{topic_filter}"

    def parse(self, topic: str) -> tuple[str, str | None]:
        """Return (topic name, argument) of a concrete topic; raise TopicError if not ours."""
        if not topic.startswith(self.prefix + "/"):
            raise TopicError(f"{topic!r} is not under {self.prefix!r}")
        levels = topic[len(self.prefix) + 1 :].split("/")
        for spec in TOPIC_SPECS:
            pattern = spec.pattern.split("/")
            if len(pattern) != len(levels):
                continue
            arg = None
            for want, got in zip(pattern, levels, strict=True):
                if want == "{arg}":
                    arg = got
                elif want != got:
                    break
            else:
                if arg == "" or (arg is not None and is_wildcard(arg)):
                    break
                return spec.name, arg
        raise TopicError(f"{topic!r} is not a hacer topic")

    def is_reply_topic(self, topic: str, client_id: str) -> bool:
        """Tell whether `topic` may answer a command of `client_id`: only `<prefix>/replies/<client_id>`.

        Anything else would let a request make the bridge publish on a topic other parts own, or
        hand results (and correlation data of the requester's choosing) to another client.
        """
        return topic == self.build("reply", client_id)

    def result_of_command(self, topic: str) -> str:
        """Return the result topic beside a set or get topic, whatever its id level holds."""
        name, arg = self.parse(topic)
        if name not in ("node_set", "node_get"):
            raise TopicError(f"{topic!r} is not a node command topic")
        return self.build("node_result", arg)

    def node_id(self, topic: str) -> int:
        """Return the integer node id of a node topic."""
        name, arg = self.parse(topic)
        if (
            not name.startswith("node_")
            or arg is None
            or not (arg.isascii() and arg.isdigit())
            or len(arg) > 16
            or int(arg) > MAX_NODE_ID
        ):
            raise TopicError(f"{topic!r} is not a node topic")
        return int(arg)


class DiscoveryTopics:
    """Home Assistant's MQTT discovery topics, under its own prefix (`homeassistant` by default)."""

    def __init__(self, prefix: str = "homeassistant") -> None:
        self.prefix = prefix.strip("/")

    def config(self, component: str, node_id: int, object_id: str) -> str:
        """The retained config topic of one entity of a node (`<prefix>/switch/hacer_1234/on/config`)."""
        return f"{self.prefix}/{_check_level(component)}/hacer_{int(node_id)}/{_check_level(object_id)}/config"

    def status(self) -> str:
        """Where Home Assistant says `online` when it starts (its birth message)."""
        return f"{self.prefix}/status"


def is_wildcard(topic: str) -> bool:
    """Tell whether `topic` contains an MQTT wildcard (and so cannot be published to)."""
    return "+" in topic or "#" in topic
