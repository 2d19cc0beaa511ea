# Sourced by prune.sh and finetune.sh: the paper's FLOPs target of a DeiT size.
#   paper_setting SIZE   sets TARGET (unless already set) and REPO, or exits 2 on a bad SIZE
paper_setting() {
    case "$1" in
        tiny) TARGET="${TARGET:-0.235}" ;;
        small) TARGET="${TARGET:-0.30}" ;;
        base) TARGET="${TARGET:-0.50}" ;;
        *) echo "error: model size must be tiny, small or base, got '$1'" >&2; exit 2 ;;
    esac
    REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
}
