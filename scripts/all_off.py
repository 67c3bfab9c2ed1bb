# Switch off every online node of a type: all_off [toggle|light_rgb]   (default: toggle)
# Outlets get on=0, lights colour 0. Logs each node it switched, and fails if any refused.
import scripting

node_type = (scripting.params() or ["toggle"])[0]
key, off = ("color", 0) if node_type == "light_rgb" else ("on", 0)
refused = []
for node in scripting.nodes(node_type):
    if not node.online:
        continue
    try:
        scripting.set(node, key, off)
        scripting.log(f"{node.name or node.id}: off")
    except scripting.ScriptError as exc:
        refused.append(node.id)
        scripting.log(f"{node.name or node.id}: {exc}")
if refused:
    raise SystemExit(f"{len(refused)} node(s) did not switch off: {refused}")
