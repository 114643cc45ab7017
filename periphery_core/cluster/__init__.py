"""The cluster: master and node processes, and the cluster view as a fold of typed events."""
