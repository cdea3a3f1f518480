"""The words of the synthetic reasoning corpus (`solutions.py`, `working.py`), English and Chinese
side by side.

The Chinese follows primary-school textbook phrasing (进位, 不够减, 辗转相除法, 总价 = 单价 × 数量)
rather than translating the English line by line. Templates take keyword fields; str.format ignores
the fields a language does not use. Changing any text here changes the corpus: bump
`synthetic.GENERATOR_VERSION`.
"""

EN_PLACES = "units tens hundreds thousands ten-thousands hundred-thousands millions ten-millions hundred-millions billions"
PLACES = {
    "en": tuple(EN_PLACES.split()),
    "zh": tuple("个位 十位 百位 千位 万位 十万位 百万位 千万位 亿位 十亿位".split()),
}

TEXT = {
    "en": {
        "so": "So {fact}.",
        "only": "{place}: only {d}, write {d}",
        "add.q": "What is {a} + {b}?",
        "add.q2": "Compute {a} + {b}.",
        "add.intro": "Line up the digits by place value and add column by column, starting from the units.",
        "add.col": "{place}: {expr} = {total}, write {digit}",
        "add.carried": " + 1 (carried)",
        "add.carry": " carry 1",
        "add.last": "{place}: carried 1, write 1",
        "sub.q": "What is {a} - {b}?",
        "sub.q2": "Compute {a} - {b}.",
        "sub.neg": "{a} is less than {b}, so the result is negative: {a} - {b} = -({b} - {a}).",
        "sub.intro": "Line up the digits and subtract column by column from the units, borrowing when a digit is too small.",
        "sub.lent": "{d} - 1 (borrowed) = {low}",
        "sub.borrow": "{low} < {sub}, borrow 1 from the {next}: {high} - {sub} = {diff}",
        "sub.col": "{place}: {body}, write {digit}",
        "sub.sep": "; ",
        "sub.negso": "{fact}, so {a} - {b} = {diff}.",
        "mul.q": "What is {a} × {b}?",
        "mul.q2": "Compute {a} × {b}.",
        "mul.split": "Split {n} by place value: {n} = {parts}.",
        "mul.shift": "{fact}, so {left} = {product}",
        "mul.add": "Add the partial products: {fact}",
        "mul.by": "{a} × {d}, digit by digit from the units:",
        "mul.col": "{place}: {expr} = {total}, write {digit}",
        "mul.carried": " + {c} (carried)",
        "mul.carry": " carry {c}",
        "mul.partial": "Multiply {a} by each digit of {b}, then add the partial products.",
        "add.sum": "Add {a} + {b} column by column:",
        "sub.diff": "Subtract {a} - {b} column by column:",
        "cmp.q": "Compare {a} and {b}. Answer with >, < or =.",
        "cmp.digits": "{n} digits",
        "cmp.digit": "1 digit",
        "cmp.len": "{a} has {la} and {b} has {lb}.",
        "cmp.more": "The number with more digits is larger, so {answer}.",
        "cmp.same": "Both numbers have {la}, so compare digit by digit from the highest place.",
        "cmp.eq": "{place}: {x} = {y}, the same",
        "cmp.diff": "{place}: {x} {r} {y}, so {answer}.",
        "cmp.all": "Every digit is the same, so {answer}.",
        "gcd.q": "What is the greatest common divisor of {a} and {b}?",
        "gcd.intro": "Use the Euclidean algorithm: divide, then divide the divisor by the remainder, until the remainder is 0.",
        "gcd.step": "{x} = {q} × {y} + {r}",
        "gcd.done": "The remainder is 0, so the greatest common divisor is {g}.",
        "lin.q": "Solve for x: {lhs} = {c}.",
        "lin.sub": "Subtract {b} from both sides: {fact}",
        "lin.add": "Add {b} to both sides: {fact}",
        "lin.div": "Divide both sides by {a}: {fact}",
        "lin.check": "Check: {fact}. Correct.",
    },
    "zh": {
        "so": "所以 {fact}。",
        "only": "{place}：只有 {d}，直接写 {d}",
        "add.q": "计算：{a} + {b}。",
        "add.q2": "{a} 加 {b} 等于多少？",
        "add.intro": "把两个数按数位对齐，从个位开始逐位相加。",
        "add.col": "{place}：{expr} = {total}，写 {digit}",
        "add.carried": " + 1（进位）",
        "add.carry": " 进 1",
        "add.last": "{place}：进位 1，写 1",
        "sub.q": "计算：{a} - {b}。",
        "sub.q2": "{a} 减 {b} 等于多少？",
        "sub.neg": "{a} 比 {b} 小，差是负数：{a} - {b} = -({b} - {a})。",
        "sub.intro": "把两个数按数位对齐，从个位开始逐位相减，不够减时向前一位借 1。",
        "sub.lent": "{d} 被借走 1 后是 {low}",
        "sub.borrow": "{low} 不够减 {sub}，从{next}借 1：{high} - {sub} = {diff}",
        "sub.col": "{place}：{body}，写 {digit}",
        "sub.sep": "，",
        "sub.negso": "{fact}，所以 {a} - {b} = {diff}。",
        "mul.q": "计算：{a} × {b}。",
        "mul.q2": "{a} 乘 {b} 等于多少？",
        "mul.split": "把 {n} 按数位拆开：{n} = {parts}。",
        "mul.shift": "{fact}，所以 {left} = {product}",
        "mul.add": "把部分积相加：{fact}",
        "mul.by": "{a} × {d}，从个位起逐位相乘：",
        "mul.col": "{place}：{expr} = {total}，写 {digit}",
        "mul.carried": " + {c}（进位）",
        "mul.carry": " 进 {c}",
        "mul.partial": "用 {a} 分别乘 {b} 的每一位，再把部分积相加。",
        "add.sum": "列竖式计算 {a} + {b}：",
        "sub.diff": "列竖式计算 {a} - {b}：",
        "cmp.q": "比较 {a} 和 {b} 的大小，用 >、< 或 = 表示。",
        "cmp.digits": "{n} 位数",
        "cmp.digit": "1 位数",
        "cmp.len": "{a} 是 {la}，{b} 是 {lb}。",
        "cmp.more": "位数多的数大，所以 {answer}。",
        "cmp.same": "两个数都是 {la}，从最高位起逐位比较。",
        "cmp.eq": "{place}：{x} = {y}，相同",
        "cmp.diff": "{place}：{x} {r} {y}，所以 {answer}。",
        "cmp.all": "每一位都相同，所以 {answer}。",
        "gcd.q": "求 {a} 和 {b} 的最大公因数。",
        "gcd.intro": "用辗转相除法：用较大数除以较小数，再用除数除以余数，直到余数为 0。",
        "gcd.step": "{x} ÷ {y} = {q}……{r}",
        "gcd.done": "余数为 0，所以最大公因数是 {g}。",
        "lin.q": "解方程：{lhs} = {c}。",
        "lin.sub": "方程两边同时减去 {b}：{fact}",
        "lin.add": "方程两边同时加上 {b}：{fact}",
        "lin.div": "方程两边同时除以 {a}：{fact}",
        "lin.check": "检验：{fact}，正确。",
    },
}

# Word problems: (question, *steps) per variant. English plurals come pre-formatted ({price_d}:
# "1 dollar" / "7 dollars"), as do the surface choices (names, items, vehicles).
WORD = {
    "en": {
        "price.total": (
            "One {one} costs {price_d}. How many dollars do {qty} {many} cost?",
            "Total cost = unit price × quantity.",
            "{price} × {qty} = {total}",
            "So {qty} {many} cost {total_d}.",
        ),
        "price.change": (
            "{name} buys {qty} {many} at {price_d} each and pays {paid_d}. How many dollars of change should {name} get?",
            "First find the total cost: {price} × {qty} = {total}.",
            "Change = amount paid - total cost = {paid} - {total} = {change}",
            "So {name} gets {change_d} in change.",
        ),
        "price.unit": (
            "{qty} {many} cost {total_d} in total. How many dollars does one {one} cost?",
            "Unit price = total cost ÷ quantity.",
            "{total} ÷ {qty} = {price}",
            "So one {one} costs {price_d}.",
        ),
        "rate.distance": (
            "A {vehicle} travels at {speed} kilometers per hour. How many kilometers does it travel in {hours_d}?",
            "Distance = speed × time.",
            "{speed} × {hours} = {dist}",
            "So it travels {dist} kilometers.",
        ),
        "rate.time": (
            "A {vehicle} travels {dist} kilometers at {speed} kilometers per hour. How many hours does the trip take?",
            "Time = distance ÷ speed.",
            "{dist} ÷ {speed} = {hours}",
            "So the trip takes {hours_d}.",
        ),
        "rate.work": (
            "{name} can {verb} {r1} {things} per hour and {name2} can {verb} {r2} {things} per hour. "
            "Working together, how many hours do they need to {verb} {job} {things}?",
            "Together they {verb} {r1} + {r2} = {both} {things} per hour.",
            "Time = total work ÷ combined rate: {job} ÷ {both} = {hours}",
            "So they need {hours_d}.",
        ),
        "unit.to_small": (
            "How many {smalls} are there in {amount}?",
            "1 {big1} = {factor} {smalls}.",
            "{big_d} = {big} × {factor} = {small} {smalls}",
            "{small} + {rest} = {answer} {smalls}",
            "So {amount} is {answer} {smalls}.",
        ),
        "unit.to_small_whole": (
            "How many {smalls} are there in {amount}?",
            "1 {big1} = {factor} {smalls}.",
            "{big_d} = {big} × {factor} = {small} {smalls}",
            "So {amount} is {answer} {smalls}.",
        ),
        "unit.to_big": (
            "How many {bigs} is {small} {smalls}?",
            "1 {big1} = {factor} {smalls}, so divide by {factor}.",
            "{small} ÷ {factor} = {big}",
            "So {small} {smalls} is {big_d}.",
        ),
    },
    "zh": {
        "price.total": (
            "{noun}每{mw} {price} 元，买 {qty} {mw}需要多少元？",
            "总价 = 单价 × 数量。",
            "{price} × {qty} = {total}（元）",
            "所以买 {qty} {mw}{noun}需要 {total} 元。",
        ),
        "price.change": (
            "{name}买了 {qty} {mw}{noun}，每{mw} {price} 元，付了 {paid} 元，应找回多少元？",
            "先求总价：{price} × {qty} = {total}（元）。",
            "找回的钱 = 付的钱 - 总价：{paid} - {total} = {change}（元）",
            "所以应找回 {change} 元。",
        ),
        "price.unit": (
            "{qty} {mw}{noun}一共 {total} 元，每{mw}多少元？",
            "单价 = 总价 ÷ 数量。",
            "{total} ÷ {qty} = {price}（元）",
            "所以每{mw}{noun} {price} 元。",
        ),
        "rate.distance": (
            "{vehicle_zh}每小时行驶 {speed} 千米，{hours} 小时行驶多少千米？",
            "路程 = 速度 × 时间。",
            "{speed} × {hours} = {dist}（千米）",
            "所以 {hours} 小时行驶 {dist} 千米。",
        ),
        "rate.time": (
            "{vehicle_zh}以每小时 {speed} 千米的速度行驶了 {dist} 千米，用了几小时？",
            "时间 = 路程 ÷ 速度。",
            "{dist} ÷ {speed} = {hours}（小时）",
            "所以用了 {hours} 小时。",
        ),
        "rate.work": (
            "{name}每小时{verb_zh} {r1} {mw}{noun}，{name2}每小时{verb_zh} {r2} {mw}，两人合作{verb_zh} {job} {mw}{noun}需要几小时？",
            "两人每小时一共{verb_zh} {r1} + {r2} = {both}（{mw}）。",
            "工作时间 = 工作总量 ÷ 工作效率：{job} ÷ {both} = {hours}（小时）",
            "所以两人合作需要 {hours} 小时。",
        ),
        "unit.to_small": (
            "{amount_zh}是多少{small_zh}？",
            "1 {big_zh} = {factor} {small_zh}。",
            "{big} {big_zh} = {big} × {factor} = {small} {small_zh}",
            "{small} + {rest} = {answer}（{small_zh}）",
            "所以 {amount_zh}是 {answer} {small_zh}。",
        ),
        "unit.to_small_whole": (
            "{amount_zh}是多少{small_zh}？",
            "1 {big_zh} = {factor} {small_zh}。",
            "{big} {big_zh} = {big} × {factor} = {small} {small_zh}",
            "所以 {amount_zh}是 {answer} {small_zh}。",
        ),
        "unit.to_big": (
            "{small} {small_zh}是多少{big_zh}？",
            "1 {big_zh} = {factor} {small_zh}，{small_zh}化成{big_zh}要除以 {factor}。",
            "{small} ÷ {factor} = {big}（{big_zh}）",
            "所以 {small} {small_zh}是 {big} {big_zh}。",
        ),
    },
}

NAMES = {
    "en": ("Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Emma"),
    "zh": ("小明", "小红", "小刚", "小丽", "李华", "王芳", "张伟", "刘洋"),
}
# (en singular, en plural, zh noun, zh measure word)
ITEMS = (
    ("pencil", "pencils", "铅笔", "支"),
    ("notebook", "notebooks", "笔记本", "本"),
    ("apple", "apples", "苹果", "个"),
    ("storybook", "storybooks", "故事书", "本"),
    ("football", "footballs", "足球", "个"),
    ("kite", "kites", "风筝", "只"),
    ("bottle of milk", "bottles of milk", "牛奶", "瓶"),
    ("bag of rice", "bags of rice", "大米", "袋"),
    ("movie ticket", "movie tickets", "电影票", "张"),
)
VEHICLES = (
    ("car", "一辆汽车"),
    ("train", "一列火车"),
    ("bus", "一辆公交车"),
    ("truck", "一辆卡车"),
)
# (en verb, en plural noun, zh verb, zh noun, zh measure word)
WORKS = (
    ("make", "dumplings", "包", "饺子", "个"),
    ("fold", "paper cranes", "折", "纸鹤", "只"),
    ("make", "cards", "做", "贺卡", "张"),
    ("make", "parts", "做", "零件", "个"),
)
# name: (factor, en big singular, en big plural, en small singular, en small plural, zh big, zh small)
UNITS = {
    "km_m": (1000, "kilometer", "kilometers", "meter", "meters", "千米", "米"),
    "kg_g": (1000, "kilogram", "kilograms", "gram", "grams", "千克", "克"),
    "h_min": (60, "hour", "hours", "minute", "minutes", "小时", "分钟"),
}
