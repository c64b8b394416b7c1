"""What several replicas on one database and one data dir need: atomic writes to the shared
folder (storage), change notices between processes (notices) and the adapter sync (adapter_sync)."""
