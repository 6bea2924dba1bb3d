"""Front ends that run on rank 0 only: the TTY and JSONL batch jobs."""
