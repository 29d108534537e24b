"""What a user runs before and beside training, away from the training path: `bench.py` (`mae-scale
bench step`: the step's images/s, MFU and memory, side by side with the official setup) and
`plan.py` (`mae-scale plan`: memory and batch layout of a preset on a given GPU, before a job)."""
