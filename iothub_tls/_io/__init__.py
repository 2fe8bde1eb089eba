"""Private I/O plumbing shared by the device clients and the local hub: waiting on
sockets, the connect/close life cycle."""
