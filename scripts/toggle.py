# Switch an outlet: toggle <node> <0|1>   (the 2015 script, written anew)
from hasapi import NodeConnection

with NodeConnection() as conn:
    conn.setVal("on", conn.params[0])
