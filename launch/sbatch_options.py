"""sbatch's long options (Slurm 22.05, ``man sbatch``): an ``--sbatch`` key must be one of them, spelled out.

sbatch itself takes any unique prefix (``--part`` for ``--partition``), which would let a key slip past
the launcher's check for options it sets itself; tests/test_launchers.py checks this table against the
installed ``sbatch --help``.
"""

SBATCH_OPTIONS = frozenset({
    "account", "acctg-freq", "array", "batch", "bb", "bbf", "begin", "chdir", "cluster-constraint", "clusters",
    "comment", "constraint", "container", "contiguous", "core-spec", "cores-per-socket", "cpu-freq", "cpus-per-gpu",
    "cpus-per-task", "deadline", "delay-boot", "dependency", "distribution", "error", "exclude", "exclusive",
    "export", "export-file", "extra-node-info", "get-user-env", "gid", "gpu-bind", "gpu-freq", "gpus",
    "gpus-per-node", "gpus-per-socket", "gpus-per-task", "gres", "gres-flags", "help", "hint", "hold", "ignore-pbs",
    "input", "job-name", "kill-on-invalid-dep", "licenses", "mail-type", "mail-user", "mcs-label", "mem", "mem-bind",
    "mem-per-cpu", "mem-per-gpu", "mincpus", "network", "nice", "no-kill", "no-requeue", "nodefile", "nodelist",
    "nodes", "ntasks", "ntasks-per-core", "ntasks-per-gpu", "ntasks-per-node", "ntasks-per-socket", "open-mode",
    "output", "overcommit", "oversubscribe", "parsable", "partition", "power", "prefer", "priority", "profile",
    "propagate", "qos", "quiet", "reboot", "requeue", "reservation", "signal", "sockets-per-node", "spread-job",
    "switches", "test-only", "thread-spec", "threads-per-core", "time", "time-min", "tmp", "uid", "usage",
    "use-min-nodes", "verbose", "version", "wait", "wait-all-nodes", "wckey", "wrap"
})  # fmt: skip
