"""Networks in ONNX files, both ways, one module per job.

    common    the optional stack, file reading, graph attributes and free dimensions
    metadata  featureshift's entries in a file's metadata_props; what a file carries (describe)
    export    a featureshift network as an ONNX graph (torch's exporter), opset conversion, saving
    check     a converted network against onnxruntime; running it naming the operator that fails
    names     readable, stable layer names from exporter scopes
    layouts   which nodes output feature maps or token sequences, and in which layout
    repair    graph edits that let onnx2torch convert what exporters write
    ops       torch modules and onnx2torch converters featureshift adds
    convert   any ONNX image classifier as a torch module (import_onnx; open with network.open_network)

onnx, onnxruntime and onnx2torch are an optional extra (`featureshift[onnx]`); they are
imported only inside functions.
"""
