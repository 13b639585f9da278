import pytest

from tide.budget import BudgetSizes, slots_per_layer

SIZES = BudgetSizes(num_experts=256, moe_layers=19, expert_bytes=6_291_456, non_expert_bytes=2_000_000_000,
                    staging_experts=2)


def test_forms():
    assert slots_per_layer(None, SIZES) == 256
    assert slots_per_layer("all", SIZES) == 256
    assert slots_per_layer("64/layer", SIZES) == 64
    assert slots_per_layer("50%", SIZES) == 128
    assert slots_per_layer("999/layer", SIZES) == 256  # a budget is a ceiling
    # 10 GiB: non-expert weights first, then the staging ring, then whole experts per layer
    expected = (10 * 2**30 - 2_000_000_000 - 2 * 6_291_456) // (6_291_456 * 19)
    assert slots_per_layer("10GiB", SIZES) == expected == 72


def test_byte_units_have_one_meaning():
    from tide.budget import parse_bytes

    assert parse_bytes("48mb") == parse_bytes("48MB") == parse_bytes("48M") == 48 * 10**6  # never megabits
    assert parse_bytes("8GiB") == parse_bytes("8gib") == 8 * 2**30
    assert parse_bytes("1TB") == 10**12 and parse_bytes("123456") == 123456 and parse_bytes("1B") == 1
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert slots_per_layer("1TB", SIZES) == 256


@pytest.mark.parametrize("budget, message", [
    ("1B", "smallest valid budget is 2132120576 bytes"),
    ("1GB", "too small"),
    ("0/layer", "at least one expert"),
    ("x/layer", "whole number"),
    ("150%", "percentage"),
    ("lots", "expected bytes"),
])
def test_errors(budget, message):
    with pytest.raises(ValueError, match=message):
        slots_per_layer(budget, SIZES)


def test_parse_bytes_keeps_the_units_the_readme_states_where_accelerate_differs():
    from accelerate.utils import convert_file_size_to_int

    from tide.budget import parse_bytes

    assert parse_bytes("10GB") == convert_file_size_to_int("10GB") == 10 * 10**9
    assert parse_bytes("8GiB") == convert_file_size_to_int("8GiB") == 8 << 30
    assert parse_bytes("123456") == 123456 and parse_bytes("1kb") == 1000  # accelerate: refused, and 125 (kilobits)
    assert convert_file_size_to_int("1kb") == 125
