"""Learn from runs: the estimate beside the measured peak per attempt (``report``), and a
site calibration fitted from those measurements (``calibrate``).

Last stage of the data flow: inputs -> estimate -> plan -> emit -> launch -> **learn**,
whose output (a calibration file) feeds the next plan's estimate.  Login-node safe:
nothing here imports torch, DeepSpeed or LLaMA-Factory (matplotlib only behind
``report --plot``).
"""
