"""Print the source of Mosaic GPU's divisibility check and the op it fails on."""
import inspect, os, runpy, sys
import jax.experimental.mosaic.gpu.layout_inference as li
src = inspect.getsource(li._check_unsatisfiable_divisibility_constraints)
print(src[:3000])
orig = li._check_unsatisfiable_divisibility_constraints
def wrapped(*a, **k):
    try:
        return orig(*a, **k)
    except AssertionError:
        import traceback
        fr = traceback.extract_tb(sys.exc_info()[2])
        tb = sys.exc_info()[2]
        while tb.tb_next: tb = tb.tb_next
        loc = tb.tb_frame.f_locals
        print("FAILED ON:", {k: str(v)[:600] for k, v in loc.items() if k in ("op", "multiple", "indices", "ref")})
        raise
li._check_unsatisfiable_divisibility_constraints = wrapped
sys.argv = [sys.argv[0]]
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_check.py"), run_name="__main__")
