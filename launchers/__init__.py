"""Turn a config plus cluster options into processes that call the engine (SLURM via submitit;
local multi-process via torchrun). Nothing here knows about models."""
