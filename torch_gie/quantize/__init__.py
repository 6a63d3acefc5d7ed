"""int8 quantization: the code arithmetic every int8 kernel and the reference backend share
(``arith``), the calibrators that pick tensor ranges (``calibrators``), and the calibration run
and its cache (``calibrate``)."""
