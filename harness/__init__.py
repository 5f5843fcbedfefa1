"""Crucible's scenario harness: YAML scenarios run against an engine in QEMU
guests (or on this host), judged restored / refused / corrupted / crashed / hung.

Host side: schema (validation), runner (one scenario), engines (ckpt, criu
adapters), targets (guest / local), report (table + JSON), bench.
Guest side (stdlib only, copied into guests): seeded, world, sysapi, workload,
and the kinds package (one module per fd kind, plus process-wide state).
"""
