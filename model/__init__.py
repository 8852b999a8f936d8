"""moeyard.model: the model definition (spec, checkpoint reader, weight names, FFN math, dtypes,
economics, make-model); imports nothing else of ours."""
