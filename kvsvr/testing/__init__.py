"""Test support shipped with KVSvr: the deterministic simulator of a replica group."""
