# Log a thermometer's temperature: gettemp <node>
from hasapi import NodeConnection

with NodeConnection() as conn:
    conn.log(conn.getVal("temperature"))
