"""Byte units, defined once: every stage counts memory in bytes and prints MiB or GiB."""

MIB = 2**20
GIB = 2**30
