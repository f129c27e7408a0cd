"""Twenty sentences for the MiniLM parity checks (varied length, punctuation, casing, numbers)."""

SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "JAX transforms numerical functions: grad, jit, vmap and pmap.",
    "Parameter-efficient fine-tuning trains a small number of extra weights.",
    "It rained all day in Paris, so we stayed inside and read.",
    "What is the capital of Australia?",
    "Low-rank adaptation freezes the pretrained weights.",
    "I love pizza!",
    "Sentence embeddings map text to vectors whose distances reflect meaning.",
    "The 2024 Olympic Games were held in Paris, France.",
    "Please restart the server before 5 p.m. tomorrow.",
    "Transformers use self-attention to mix information across tokens.",
    "Bananas are berries, but strawberries are not.",
    "The stock market fell sharply after the announcement.",
    "She plays the violin beautifully.",
    "Quantum computers exploit superposition and entanglement.",
    "Can you recommend a good book about the history of mathematics?",
    "Error: file not found.",
    "The mitochondria is the powerhouse of the cell.",
    "Short.",
]
