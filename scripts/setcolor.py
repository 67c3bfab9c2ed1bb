# Set an RGB light's colour: setcolor <node> <RRGGBB>   ("#" and "0x" prefixes allowed)
# The 2015 script sent the hex text itself by mistake; the light wants the integer 0xRRGGBB.
from hasapi import NodeConnection

with NodeConnection() as conn:
    text = conn.params[0].strip().lower().removeprefix("#").removeprefix("0x")
    if len(text) != 6:
        raise ValueError(f"colour {conn.params[0]!r} is not RRGGBB")
    conn.setVal("color", int(text, 16))
