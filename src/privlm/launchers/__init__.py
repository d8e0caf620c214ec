"""Where a sweep's runs train: the local process pool lives in `privlm.sweep`; `slurm` submits them to a SLURM
cluster as one job array through submitit."""
