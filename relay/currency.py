"""Currency codes and minor-unit exponents: ISO 4217's, and Polar's. Pure data.

Exponent = number of digits after the decimal point of the minor unit: USD 2 (cents),
JPY 0, KWD 3, CLF 4. Codes without minor units (precious metals, testing codes) are left out:
revenue is never reported in them.

Polar's amounts are not ISO's: Polar follows Stripe, whose zero-decimal list differs from ISO
4217 for a few codes. Read from polarsource/polar `server/polar/kit/currency.py`
(`_ZERO_DECIMAL_CURRENCIES`, `get_currency_decimal_factor`) at commit c6c3645 (2026-08-22):
factor 1 for the 15 codes in `_POLAR_ZERO_DECIMAL`, factor 100 for every other code. So ISK and
UGX (ISO 0) come with two decimals, MGA (ISO 2) with none, and the ISO three-decimal codes with
two. Every money figure the relay computes from a Polar amount (metrics, `minor_to_major`, the
`relay dev` sink, the ledger) uses `polar_exponent`; `exponent` (ISO) only says whether a code
is a currency at all.
"""

from __future__ import annotations

from decimal import Decimal

_EXPONENT_0 = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"
_EXPONENT_3 = "BHD IQD JOD KWD LYD OMR TND"
_EXPONENT_4 = "CLF UYW"
_EXPONENT_2 = (
    "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD BTN BWP "
    "BYN BZD CAD CDF CHE CHF CHW CNY COP COU CRC CUC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR "
    "FJD FKP GBP GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW "
    "KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN "
    "NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK SGD "
    "SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY TTD TWD TZS UAH USD USN UYU "
    "UZS VED VES WST XCD XCG YER ZAR ZMW ZWG ZWL"
)

EXPONENTS: dict[str, int] = {
    code: exponent
    for exponent, codes in ((0, _EXPONENT_0), (2, _EXPONENT_2), (3, _EXPONENT_3), (4, _EXPONENT_4))
    for code in codes.split()
}


_POLAR_ZERO_DECIMAL = frozenset(
    {"BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "VND", "VUV", "XAF"}
    | {"XOF", "XPF"}
)


def exponent(code: str) -> int | None:
    """The minor-unit exponent of an ISO 4217 code (any case), or None if unknown."""
    return EXPONENTS.get(code.upper())


def polar_exponent(code: str) -> int | None:
    """The exponent of Polar's amounts in this currency (any case), or None if the code is not
    an ISO 4217 currency: 0 for Polar's zero-decimal codes, else 2."""
    upper = code.upper()
    if upper not in EXPONENTS:
        return None
    return 0 if upper in _POLAR_ZERO_DECIMAL else 2


def polar_major_text(amount: int, code: str, *, grouping: bool = False) -> str:
    """A Polar amount in major units as text, by Polar's exponent: `4410, "JPY"` -> "4410",
    `-1299, "EUR"` -> "-12.99" ("1,299.00" with `grouping`); an unknown code keeps minor
    units. Exact at any size (no float)."""
    digits = polar_exponent(code) or 0
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), 10**digits)
    number = f"{whole:,}" if grouping else str(whole)
    return f"{sign}{number}.{frac:0{digits}d}" if digits else f"{sign}{number}"


def minor_to_major(amount: int, code: str) -> Decimal:
    """A Polar amount (smallest unit, by Polar's exponent) in major units."""
    exp = polar_exponent(code)
    if exp is None:
        raise ValueError(f"unknown currency {code!r}")
    return Decimal(amount).scaleb(-exp)


def major_to_minor(amount: Decimal, code: str) -> int:
    """Major units as a Polar amount (smallest unit, by Polar's exponent)."""
    exp = polar_exponent(code)
    if exp is None:
        raise ValueError(f"unknown currency {code!r}")
    minor = amount.scaleb(exp)
    if minor != minor.to_integral_value():
        raise ValueError(f"{amount} {code.upper()} has more than {exp} decimal places")
    return int(minor)
