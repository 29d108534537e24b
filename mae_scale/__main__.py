from mae_scale.cli import entry

entry()
