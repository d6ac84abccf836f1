"""Jobs in flight: the JobQueue port and its memory and Redis Streams implementations."""
