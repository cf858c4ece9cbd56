"""Multi-node launch support: hostfile validation and node-local DeepSpeed settings (NVMe offload path).

The shell scripts that use these live in the repository's ``launch/`` folder; see docs/MULTINODE.md.
"""
