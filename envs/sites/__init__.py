"""Generated local web sites the browser env serves on loopback."""
