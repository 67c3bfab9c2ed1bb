"""The runner process: run requests become script processes with live logs."""
