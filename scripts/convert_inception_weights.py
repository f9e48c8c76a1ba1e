"""Convert the published FID InceptionV3 weights (pytorch-fid .pth or PaddleMIX .pdparams) to safetensors, once.

    python scripts/convert_inception_weights.py --input pt_inception-2015-12-05-6726825d.pth \
        --output pt_inception-2015-12-05.safetensors --trust_pickle

Both inputs are pickle files: they are read only with --trust_pickle (a file you trust), and then with a
restricted unpickler that resolves only array-building globals. The output uses pytorch-fid key names and
records the source's SHA-256.
"""
import argparse
import json

from ppdiffusers_fast.evaluation.inception_convert import convert_inception_weights


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help=".pth (pytorch-fid), .pdparams (PaddleMIX) or .safetensors")
    parser.add_argument("--output", required=True, help="output .safetensors file")
    parser.add_argument("--trust_pickle", action="store_true",
                        help="allow reading a pickle file (only for a file whose source you trust)")
    args = parser.parse_args(argv)
    try:
        report = convert_inception_weights(args.input, args.output, trust_pickle=args.trust_pickle)
    except (PermissionError, FileNotFoundError, KeyError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    print(json.dumps(report, indent=1))
    if not report["recognized"]:
        print("note: the source does not match the published pytorch-fid / PaddleMIX files; "
              "FID values will not be comparable with published numbers")


if __name__ == "__main__":
    main()
