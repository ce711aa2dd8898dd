# Sourced by quickstart.sh and tools/compare.py: the shipped text and image-text pairs as Megatron
# datasets. prepare_quickstart_data OUT trains a byte-level BPE with Qwen's special tokens on
# examples/data/text.jsonl (OUT/tokenizer) and preprocesses both files (OUT/data/{text,image_text}).
# Needs REPO (the repository root) and PYTHON.

prepare_quickstart_data() {
    local out="$1"
    echo "== tokenizer: byte-level BPE with Qwen's special tokens, trained on examples/data/text.jsonl"
    "$PYTHON" "$REPO/tools/train_tokenizer.py" --input "$REPO/examples/data/text.jsonl" --vocab-size 1000 \
        --output "$out/tokenizer"
    echo "== preprocessing: text documents and image-text pairs (T2I 80% / I2T 20%)"
    "$PYTHON" "$REPO/tools/preprocess_data.py" --input "$REPO/examples/data/text.jsonl" --output-prefix "$out/data/text" \
        --tokenizer-model "$out/tokenizer" --append-eod --workers 2
    "$PYTHON" "$REPO/tools/preprocess_data.py" --input "$REPO/examples/data/image_text.jsonl.gz" \
        --output-prefix "$out/data/image_text" --tokenizer-model "$out/tokenizer" --workers 2
}
