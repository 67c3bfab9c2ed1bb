"""The bridge process: UDP beacons in, retained presence out, node commands over TCP."""
