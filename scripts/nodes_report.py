# Log every node the bus knows, with its presence: nodes_report
import scripting

for node in scripting.nodes():
    state = "online" if node.online else "offline"
    scripting.log(f"{node.id} {node.name or '-'} {node.type} {node.ip or '-'} {state}")
