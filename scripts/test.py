# Check that scripts run: logs its parameters, talks to no node.
import sys

print("test script running with", sys.argv[1:])
