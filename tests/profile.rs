//! The kernel profile (`tinytune::profile`): what it counts and where it puts it. One test in
//! its own binary, because the profile is process-wide.

use tinytune::{profile, DType, Device, Rng, Tensor};

#[test]
fn the_profile_counts_each_kernel_once_by_phase_with_its_flops() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(1);
    let a = Tensor::randn(&[33, 20], 0.0, 1.0, DType::F32, &dev, &mut rng).unwrap().requires_grad().unwrap();
    let b = Tensor::randn(&[20, 17], 0.0, 1.0, DType::F32, &dev, &mut rng).unwrap();
    // Off: nothing is recorded.
    profile::set_enabled(false);
    profile::reset();
    a.matmul(&b).unwrap();
    assert!(profile::snapshot().0.is_empty(), "recorded while off");

    profile::set_enabled(true);
    profile::reset();
    let y = a.matmul(&b).unwrap().silu().unwrap();
    y.sum_all().unwrap().backward().unwrap();
    profile::set_enabled(false);
    let (rows, wall, _) = profile::snapshot();
    let find = |phase: &str, kernel: &str| rows.iter().find(|r| r.phase == phase && r.kernel == kernel).cloned();
    let mm = find("forward", "matmul").expect("the forward matmul");
    assert_eq!(mm.calls, 1);
    assert_eq!(mm.flops, 2.0 * 33.0 * 20.0 * 17.0);
    assert_eq!(mm.bytes, 33 * 17 * 4, "the output's bytes");
    assert!(find("forward", "unary:silu").is_some(), "{rows:?}");
    // The gradient of a is g·bᵀ, a matmul run by matmul's backward rule.
    let back = find("backward:matmul", "matmul").expect("matmul's backward rule");
    assert_eq!(back.flops, 2.0 * 33.0 * 17.0 * 20.0);
    let in_kernels: f64 = rows.iter().map(|r| r.secs).sum();
    assert!(in_kernels <= wall.as_secs_f64(), "kernel time {in_kernels} within the window's {wall:?}");
    let table = profile::table();
    for want in ["matmul", "backward:matmul", "(outside kernels)", "GFLOP/s"] {
        assert!(table.contains(want), "{want} missing from\n{table}");
    }
}
